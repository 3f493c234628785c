"""Accuracy ablation of ACT's options on Gemma-3 270M (CPU): which settings help, which hurt, on the same items.

    python benchmarks/ablation_act_gemma.py --tasks arc_easy sst2 --limit 200 --out benchmarks/results/act_ablation.json

Each configuration is compared with the unpatched model on the same items (paired bootstrap CI, exact McNemar).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import attnpatch
from attnpatch.eval import load_task, paired_comparison, score_items
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
    results = {"model": "gemma-3-270m (fp32)", "device": "cpu", "limit": args.limit, "tasks": {}}
    for task in args.tasks:
        items = load_task(task, shots=SHOTS.get(task, 0), limit=args.limit)
        labels = [it.label for it in items]

        def correct(preds, labels=labels):
            return [int(p == y) for p, y in zip(preds, labels, strict=True)]

        t0 = time.perf_counter()
        base = correct(score_items(model, tok, items, batch_size=args.batch_size, progress=False))
        rows = {"unpatched": {"accuracy": sum(base) / len(base), "seconds": time.perf_counter() - t0}}
        for name, options in CONFIGS.items():
            t0 = time.perf_counter()
            with attnpatch.patched(model, "act", **options):
                preds = score_items(model, tok, items, batch_size=args.batch_size, progress=False)
            rows[name] = {
                "options": options,
                "seconds": time.perf_counter() - t0,
                **paired_comparison(base, correct(preds)),
            }
            print(task, name, json.dumps(rows[name], default=float), flush=True)
        results["tasks"][task] = {"items": len(items), "shots": SHOTS.get(task, 0), "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()
