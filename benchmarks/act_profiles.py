"""Calibrated ACT profiles on real models: calibrate on each task's calibration part, evaluate on its eval part.

    python benchmarks/act_profiles.py --model gemma-3-270m --cal-limit 12 --limit 100
    python benchmarks/act_profiles.py --model gemma-3-270m --limit 60 --reuse-profile   # re-evaluate the saved one

Per model: `attnpatch.calibrate` (timed) writes benchmarks/results/profiles/<model>/, then unpatched, ACT with the
default heads (every head of layers 2..L-2) and ACT with the profile are scored on the same evaluation items (never
used for calibration), with bootstrap CIs and McNemar p-values against unpatched. Results go to
benchmarks/results/act_profiles_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import attnpatch
from attnpatch.eval.runner import evaluate
from attnpatch.models import load
from attnpatch.profiles import Profile

TASKS = ["sst2", "arc_easy", "arc_challenge", "piqa", "copa", "openbookqa"]
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--cal-limit", type=int, default=12, help="calibration items per task")
    parser.add_argument("--limit", type=int, default=100, help="evaluation items per task")
    parser.add_argument("--screen-layers", type=int, default=None)
    parser.add_argument("--min-visible-rows", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--reuse-profile", action="store_true", help="evaluate the saved profile again (keeps its calibration record)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    profile_dir = os.path.join(RESULTS, "profiles", args.model)
    prefix = os.path.join(RESULTS, f"act_profiles_{args.model}")
    if args.reuse_profile:
        profile = Profile.load(profile_dir)
        with open(prefix + ".json") as f:
            calibration = json.load(f)["calibration"]
    else:
        started = time.perf_counter()
        profile = attnpatch.calibrate(
            model, tok, args.tasks, limit=args.cal_limit, screen_layers=args.screen_layers,
            min_visible_rows=args.min_visible_rows, batch_size=args.batch_size,
            checkpoint=os.path.join(RESULTS, "profiles", f"{args.model}.checkpoint.jsonl"),
        )  # fmt: skip
        calibration_seconds = time.perf_counter() - started
        profile.save(profile_dir)
        print(f"profile: {profile.heads} in {calibration_seconds:.0f} s", flush=True)
        calibration = {
            "seconds": calibration_seconds,
            "heads": {str(k): v for k, v in profile.heads.items()},
            "selected": profile.num_heads,
            "metadata": profile.metadata,
            "cal_items_per_task": args.cal_limit,
        }
    configs = {
        "unpatched": None,
        "act default heads": {"method": "act", "min_visible_rows": args.min_visible_rows},
        "act calibrated profile": profile,
    }
    report = evaluate(
        model, tok, args.tasks, configs=configs, limit=args.limit, batch_size=args.batch_size, model_name=args.model
    )
    report.save(prefix)
    with open(prefix + ".json") as f:
        data = json.load(f)
    data["calibration"] = calibration
    data["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    data["versions"] = {"torch": torch.__version__, "attnpatch": attnpatch.__version__}
    with open(prefix + ".json", "w") as f:
        json.dump(data, f, indent=1)
    print(report.to_markdown())


if __name__ == "__main__":
    main()
