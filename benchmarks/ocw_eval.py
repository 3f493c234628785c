"""Only Connect Wall A/B on real models: unpatched vs ACT (the committed calibrated profile when there is one).

    python benchmarks/ocw_eval.py --model gemma-3-270m --mode constrained
    python benchmarks/ocw_eval.py --model gemma-3-270m --mode generate --limit 4 --shots 3
    python benchmarks/ocw_eval.py --model gemma-3-270m --mode generate --rescore   # re-parse stored output, no model

Writes benchmarks/results/ocw_<model>_<mode>.json and .md (the report of `attnpatch.eval.evaluate_ocw`, plus device,
versions, threads and wall time). CPU, one thread by default (shared machines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import attnpatch
from attnpatch.eval.ocw.runner import OCWReport, evaluate_ocw, rescore
from attnpatch.eval.ocw.walls import load_walls
from attnpatch.models import load
from attnpatch.profiles import Profile

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _configs(model_name: str) -> dict:
    path = os.path.join(RESULTS, "profiles", model_name)
    if os.path.isfile(os.path.join(path, "attnpatch_config.json")):
        return {"unpatched": None, "act profile": Profile.load(path)}
    return {"unpatched": None, "act": {"method": "act"}}


def _save(report: OCWReport, prefix: str, extra: dict) -> None:
    report.save(prefix)
    with open(prefix + ".json") as f:
        data = json.load(f)
    data.update(extra)
    with open(prefix + ".json", "w") as f:
        json.dump(data, f, indent=1)
    print(report.to_markdown())


def _rescore(prefix: str, split: str) -> None:
    with open(prefix + ".json") as f:
        data = json.load(f)
    report = rescore(data, load_walls(split))
    report.notes.append("model output re-parsed and re-scored by `ocw_eval.py --rescore` (no model run)")
    _save(report, prefix, {k: data[k] for k in ("seconds_total", "device", "versions") if k in data})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--mode", default="constrained", choices=["constrained", "generate"])
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="first N walls of the split (default: all)")
    parser.add_argument("--shots", type=int, default=None, help="default: 3 for generate, 0 for constrained")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-connections", action="store_true", help="generate mode: task 1 only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--rescore", action="store_true", help="re-parse the stored output of an earlier run")
    args = parser.parse_args()
    prefix = os.path.join(RESULTS, f"ocw_{args.model}_{args.mode}{args.tag}")
    if args.rescore:
        return _rescore(prefix, args.split)
    torch.set_num_threads(args.threads)
    shots = args.shots if args.shots is not None else (3 if args.mode == "generate" else 0)
    walls = load_walls(args.split)[: args.limit]
    model, tok = load(args.model)
    started = time.perf_counter()
    report = evaluate_ocw(
        model, tok, walls, configs=_configs(args.model), mode=args.mode, train=load_walls("train"), shots=shots,
        connections=not args.no_connections, batch_size=args.batch_size, model_name=args.model, split=args.split,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    report.notes.append(
        f"{len(walls)} walls ({'first ' + str(args.limit) if args.limit else 'all'} of {args.split}); "
        f"{seconds:.0f} s in total on CPU, {args.threads} thread(s)"
    )
    device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    versions = {"torch": torch.__version__, "attnpatch": attnpatch.__version__}
    _save(report, prefix, {"seconds_total": seconds, "device": device, "versions": versions})


if __name__ == "__main__":
    main()
