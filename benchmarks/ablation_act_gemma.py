"""Accuracy ablation of ACT's options on Gemma-3 270M (CPU): which settings help, which hurt, on the same items.

    python benchmarks/ablation_act_gemma.py --tasks arc_easy sst2 --limit 200 --out benchmarks/results/act_ablation.json

Each configuration is compared with the unpatched model on the same items (paired bootstrap CI, exact McNemar), under
both of lm-eval's metrics (`acc`: summed log-likelihood; `acc_norm`: divided by the option's length in characters
without its leading space), from one scoring pass per configuration. Tasks not named keep their results in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import attnpatch
from attnpatch.eval import METRICS, load_task, option_logprobs, paired_comparison, pick
from attnpatch.models import load

CONFIGS = {
    "act default (min_visible_rows=1)": {},
    "act min_visible_rows=8": {"min_visible_rows": 8},
    "act min_visible_rows=16": {"min_visible_rows": 16},
    "act beta=0.7 min_visible_rows=8": {"beta": 0.7, "min_visible_rows": 8},
}
SHOTS = {"sst2": 4, "arc_easy": 0, "boolq": 0, "piqa": 0, "arc_challenge": 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "sst2"])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/act_ablation.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, tok = load("gemma-3-270m")
    results = {"model": "gemma-3-270m (fp32)", "device": "cpu", "limit": args.limit, "metrics": list(METRICS)}
    earlier = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
    kept = {t: r for t, r in earlier.get("tasks", {}).items() if t not in args.tasks and "acc" in r}
    results["tasks"] = kept
    if kept and earlier.get("note"):
        results["note"] = earlier["note"]
    for task in args.tasks:
        items = load_task(task, shots=SHOTS.get(task, 0), limit=args.limit)
        labels = [it.label for it in items]

        def correct(logprobs, metric, items=items, labels=labels):
            picks = [pick(lp, it.options, metric) for lp, it in zip(logprobs, items, strict=True)]
            return [int(p == y) for p, y in zip(picks, labels, strict=True)]

        def scored(options=None, items=items):
            t0 = time.perf_counter()
            if options is None:
                logprobs = option_logprobs(model, tok, items, batch_size=args.batch_size, progress=False)
            else:
                with attnpatch.patched(model, "act", **options):
                    logprobs = option_logprobs(model, tok, items, batch_size=args.batch_size, progress=False)
            return logprobs, time.perf_counter() - t0

        base_lp, seconds = scored()
        base = {m: correct(base_lp, m) for m in METRICS}
        per_metric = {m: {"unpatched": {"accuracy": sum(base[m]) / len(base[m])}} for m in METRICS}
        timing = {"unpatched": seconds}
        for name, options in CONFIGS.items():
            logprobs, timing[name] = scored(options)
            for m in METRICS:
                per_metric[m][name] = {"options": options, **paired_comparison(base[m], correct(logprobs, m))}
            print(task, name, json.dumps({m: per_metric[m][name] for m in METRICS}, default=float), flush=True)
        results["tasks"][task] = {"items": len(items), "shots": SHOTS.get(task, 0), "seconds": timing, **per_metric}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()
