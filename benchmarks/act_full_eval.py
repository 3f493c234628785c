"""ACT on whole eval parts, with samples large enough to decide: unpatched vs ACT with its default heads vs ACT with a
profile calibrated on many calibration items, both metrics (acc, acc_norm), paired CIs, McNemar p-values, and whether
each effect survives Holm's and Benjamini-Hochberg's corrections over every comparison of the run.

    python benchmarks/act_full_eval.py                                    # both models, every task, all eval items
    python benchmarks/act_full_eval.py --models gemma-3-270m --tasks copa --limit 50 --cal-limit 8   # a slice

Per model: the profile is calibrated once on each task's calibration part (`--cal-limit` items per task; never an
evaluated item) and saved under the output folder (a rerun loads it; `--profile` gives one instead); then each task
is scored and saved as soon as it is done (`<out>/<model>/<task>.json`, with per-item log-likelihoods), so an
interrupted run resumes where it stopped. The summary (`<out>/act_full_eval.json` and `.md`) adds the corrections
and, for a sliced run (`--limit`), the time the whole eval parts would take at the measured rate.
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
from attnpatch.eval.stats import benjamini_hochberg, holm
from attnpatch.eval.tasks import task_sizes
from attnpatch.models import load
from attnpatch.profiles import Profile

MODELS = ["gemma-3-270m", "qwen2.5-0.5b-instruct"]
TASKS = ["sst2", "boolq", "piqa", "arc_easy", "arc_challenge", "openbookqa", "copa", "hellaswag", "cb"]
RESULTS = os.path.join(os.path.dirname(__file__), "results", "act_full")
ALPHA = 0.05


def _profile(model, tok, name: str, args: argparse.Namespace, out: str) -> tuple[Profile, dict]:
    """The given profile, the one saved by an earlier run, or a new calibration on the calibration parts."""
    path = args.profile or os.path.join(out, "profile")
    if os.path.isfile(os.path.join(path, "attnpatch_config.json")):
        return Profile.load(path), {"path": path, "calibrated_now": False}
    started = time.perf_counter()
    profile = attnpatch.calibrate(
        model, tok, args.tasks, limit=args.cal_limit, screen_layers=args.screen_layers, batch_size=args.batch_size,
        checkpoint=os.path.join(out, "profile.checkpoint.jsonl"),
    )  # fmt: skip
    profile.save(path)
    seconds = time.perf_counter() - started
    return profile, {"path": path, "calibrated_now": True, "seconds": seconds, "cal_items_per_task": args.cal_limit}


def run_model(name: str, args: argparse.Namespace) -> dict:
    """Every task of one model, each saved as it finishes (`<task>.json`: `EvalReport.to_dict()` with per-item
    log-likelihoods); returns {"tasks": {task: that dict}, "profile": the profile's record}."""
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    model, tok = load(name, dtype=torch.float32)
    profile, record = _profile(model, tok, name, args, out)
    record["heads"] = {str(k): v for k, v in profile.heads.items()}
    configs = {"unpatched": None, "act default heads": {"method": "act"}, "act profile": profile}
    done = {}
    for task in args.tasks:
        path = os.path.join(out, f"{task}.json")
        if os.path.isfile(path) and not args.limit:
            with open(path) as f:
                done[task] = json.load(f)
            continue
        report = evaluate(
            model, tok, [task], configs=configs, limit=args.limit, batch_size=args.batch_size, keep_items=True,
            model_name=name, progress=args.progress,
        )  # fmt: skip
        done[task] = report.to_dict()
        with open(path, "w") as f:
            json.dump(done[task], f)
        print(f"{name} {task}: {json.dumps({k: round(v, 1) for k, v in report.seconds.items()})}", flush=True)
    return {"tasks": done, "profile": record}


def corrected(runs: dict) -> list[dict]:
    """One row per (model, task, config, metric) comparison with unpatched, with Holm and BH over all of them."""
    rows = []
    for model, run in runs.items():
        for task, data in run["tasks"].items():
            for config, result in data["results"][task].items():
                for metric in data["metrics"]:
                    paired = result[metric].get("paired")
                    if paired is not None:
                        rows.append(dict(model=model, task=task, config=config, metric=metric, n=result["n"], **paired))
    for metric in {r["metric"] for r in rows}:  # one family per metric: the two metrics ask the same question twice
        family = [r for r in rows if r["metric"] == metric]
        p = [r["p_mcnemar"] for r in family]
        for r, h, b in zip(family, holm(p), benjamini_hochberg(p), strict=True):
            r.update(p_holm_run=h, p_bh_run=b, survives_holm=h < ALPHA, survives_bh=b < ALPHA)
    return rows


def extrapolate(runs: dict, limit: int | None) -> dict:
    """Seconds the whole eval parts would take at the measured seconds per item (per model, task and config)."""
    if not limit:
        return {}
    sizes = task_sizes(sorted({t for run in runs.values() for t in run["tasks"]}))
    out = {}
    for model, run in runs.items():
        total = 0.0
        for task, data in run["tasks"].items():
            n = next(iter(data["results"][task].values()))["n"]
            total += sum(s for s in data["seconds"].values()) / n * sizes[task]["eval"]
        out[model] = round(total)
    return out


def markdown(summary: dict) -> str:
    lines = [
        f"ACT on {'the first ' + str(summary['limit']) + ' items of ' if summary['limit'] else ''}the eval parts "
        f"({summary['device']}); Holm and BH over all {len(summary['comparisons'])} comparisons per metric.",
        "",
        "| model | task | n | config | metric | diff | 95% CI | p | p Holm | p BH | survives |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["comparisons"]:
        lo, hi = r["diff_ci"]
        verdict = "Holm" if r["survives_holm"] else ("BH" if r["survives_bh"] else "no")
        lines.append(
            f"| {r['model']} | {r['task']} | {r['n']} | {r['config']} | {r['metric']} | {100 * r['diff']:+.1f} | "
            f"{100 * lo:+.1f}..{100 * hi:+.1f} | {r['p_mcnemar']:.2g} | {r['p_holm_run']:.2g} | {r['p_bh_run']:.2g} | "
            f"{verdict} |"
        )
    for model, seconds in summary.get("full_run_estimate_s", {}).items():
        lines.append(f"\nWhole eval parts for {model}, extrapolated: {seconds / 3600:.1f} h (3 configurations).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the whole eval part)")
    parser.add_argument("--cal-limit", type=int, default=100, help="calibration items per task (default: 100)")
    parser.add_argument("--screen-layers", type=int, default=None, help="calibrate: screen layers, then heads")
    parser.add_argument("--profile", default=None, help="a profile directory instead of calibrating (one model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=RESULTS, help=f"output folder (default: {RESULTS})")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.profile and len(args.models) > 1:
        parser.error("--profile fits one model; give one --models")
    if args.limit and args.out == RESULTS:  # a slice never overwrites (or resumes from) the whole run's files
        args.out = os.path.join(RESULTS, f"limit{args.limit}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = {name: run_model(name, args) for name in args.models}
    summary = {
        "limit": args.limit,
        "tasks": args.tasks,
        "device": f"cpu ({platform.machine()}, {args.threads} threads)",
        "versions": {"torch": torch.__version__, "attnpatch": attnpatch.__version__},
        "seconds": round(time.perf_counter() - started, 1),
        "profiles": {name: run["profile"] for name, run in runs.items()},
        "accuracy": {
            name: {
                task: {c: {m: r[m]["accuracy"] for m in d["metrics"]} for c, r in d["results"][task].items()}
                for task, d in run["tasks"].items()
            }
            for name, run in runs.items()
        },  # fmt: skip
        "comparisons": corrected(runs),
        "full_run_estimate_s": extrapolate(runs, args.limit),
    }
    with open(os.path.join(args.out, "act_full_eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "act_full_eval.md"), "w") as f:
        f.write(markdown(summary) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    main()
