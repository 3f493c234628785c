"""ACT on whole eval parts, with samples large enough to decide: unpatched vs ACT with its default heads vs ACT with a
profile calibrated on many calibration items, both metrics (acc, acc_norm), paired CIs, McNemar p-values, and whether
each effect survives Holm's and Benjamini-Hochberg's corrections over every comparison of the run.

    python benchmarks/act_full_eval.py                                    # both models, every task, all eval items
    python benchmarks/act_full_eval.py --models gemma-3-270m --tasks copa --limit 50 --cal-limit 8   # a slice

Per model: the profile is calibrated once on each task's calibration part (`--cal-limit` items per task; never an
evaluated item) and saved under the output folder (a rerun loads it, or the one its `profile.json` names; `--profile`
gives one instead; `--add-profile` scores more profiles beside it); then each task is scored and saved as soon as it is
done (`<out>/<model>/<task>.json`, with per-item log-likelihoods; each of its configurations under
`<out>/<model>/checkpoint/` as soon as that is done), so an interrupted run resumes where it stopped. A task an earlier
run saved keeps its configurations' scores and is scored only for those it lacks (an added profile). The summary
(`<out>/act_full_eval.json` and `.md`) covers every task saved under the output folder (this run's and earlier runs',
every model), adds the corrections and, for a sliced run (`--limit`), the time the whole eval parts would take at the
measured rate; `--summarize` only rewrites it (for `--models` and `--tasks`). A `--configs` share scores its
configurations into the checkpoint and writes no summary; one that includes `unpatched` and another configuration
also writes its task reports with just those (an interim result: the tables show "not yet" for the others), unless
a saved report has more, and a later run completes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import attnpatch
from attnpatch.eval.runner import Checkpoint, evaluate, write_json
from attnpatch.eval.scoring import _build_rows
from attnpatch.eval.stats import benjamini_hochberg, holm
from attnpatch.eval.tasks import Item, load_task
from attnpatch.models import load
from attnpatch.profiles import Profile

MODELS = ["gemma-3-270m", "qwen2.5-0.5b-instruct"]
TASKS = ["sst2", "boolq", "piqa", "arc_easy", "arc_challenge", "openbookqa", "copa", "hellaswag", "cb"]
RESULTS = os.path.join(os.path.dirname(__file__), "results", "act_full")
ALPHA = 0.05


def _profile(model, tok, name: str, args: argparse.Namespace, out: str) -> tuple[Profile, dict]:
    """The given profile, the one saved by an earlier run, or a new calibration on the calibration parts; with a
    record of its calibration (items, tasks, seconds, from the profile's metadata)."""
    path = args.profile or _saved_record(out).get("path") or os.path.join(out, "profile")
    calibrated_now = not os.path.isfile(os.path.join(path, "attnpatch_config.json"))
    if calibrated_now:
        profile = attnpatch.calibrate(
            model, tok, args.tasks, limit=args.cal_limit, screen_layers=args.screen_layers,
            batch_size=args.batch_size, checkpoint=os.path.join(out, "profile.checkpoint.jsonl"),
        )  # fmt: skip
        profile.save(path)
    else:
        profile = Profile.load(path)
    return profile, _record(profile, path, calibrated_now)


def _record(profile: Profile, path: str, calibrated_now: bool = False) -> dict:
    """What the summary says of a profile: where it is, its calibration (items, tasks, seconds) and its heads."""
    meta = profile.metadata or {}
    return {
        "path": os.path.relpath(path),
        "calibrated_now": calibrated_now,
        "calibration_items": meta.get("items"),
        "calibration_tasks": meta.get("tasks"),
        "seconds": _compute_seconds(meta),
        "last_run_seconds": (meta.get("seconds") or {}).get("total"),
        "resumed": meta.get("resumed", 0),
        "heads": {str(k): v for k, v in profile.heads.items()},
    }


def _compute_seconds(meta: dict) -> float | None:
    """A calibration's compute: its last run's wall time plus what the candidates it resumed from a checkpoint took
    when they ran. Profiles from before `seconds.compute` existed have it only when they resumed nothing or every
    candidate (then the resumed part is all the candidate runs); otherwise None."""
    seconds = meta.get("seconds") or {}
    if "compute" in seconds or "total" not in seconds:
        return seconds.get("compute")
    resumed, runs = meta.get("resumed", 0), seconds.get("candidates", 0) + len(meta.get("layer_screen", []))
    if resumed == 0:
        return seconds["total"]
    if resumed == runs:
        return seconds["total"] + seconds.get("screening", 0.0) + seconds["per_candidate"] * seconds["candidates"]
    return None


def _calibration_time(seconds: float | None, last_run: float | None, resumed: int | None) -> str:
    """How long a calibration took, in words: its compute over runs, or its last run's when that is all we know."""
    if seconds:
        return f"{seconds / 60:.1f} min" + (f" over runs ({resumed} candidates resumed)" if resumed else "")
    return f"{last_run / 60:.1f} min in its last run ({resumed} candidates resumed, not counted)"


def added_profiles(paths: list[str]) -> tuple[dict[str, Profile], dict[str, dict]]:
    """Profiles scored beside the run's own, each as the configuration "act profile, <n> items" (n: the calibration
    items its metadata records), with their records."""
    configs, records = {}, {}
    for path in paths:
        profile = Profile.load(path)
        name = f"act profile, {(profile.metadata or {}).get('items')} items"
        if name in configs:
            raise SystemExit(f"two added profiles were calibrated on as many items; they would both be {name!r}")
        configs[name], records[name] = profile, _record(profile, path)
    return configs, records


def _saved_record(out: str) -> dict:
    """The profile record an earlier run saved in the model folder `out` (`profile.json`), or {}."""
    path = os.path.join(out, "profile.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_saved_profile(out: str, record: dict) -> None:
    """Refuse to add to the saved reports of `out` when their "act profile" had other heads than this run's."""
    saved = _saved_record(out)
    reports = [name for name in os.listdir(out) if name.endswith(".json") and name != "profile.json"]
    if reports and saved.get("heads") is not None and saved["heads"] != record["heads"]:
        raise SystemExit(
            f"the reports saved in {out} scored 'act profile' with heads {saved['heads']} ({saved.get('path')}), this "
            f"run's profile has {record['heads']} ({record['path']}): give that --profile, add this one with "
            "--add-profile, or use another --out"
        )


def seed_checkpoint(saved: dict, task: str, items: list[Item], configs: dict, folder: str) -> list[str]:
    """Put the per-item log-likelihoods of the configurations a saved report of `task` already has into the
    checkpoint `folder`, so that `evaluate` on `items` scores only the configurations it lacks; refused when the
    report holds other items. Returns the names taken from the report."""
    kept = saved["items"][task]
    if kept["ids"] != [it.id for it in items] or kept["labels"] != [it.label for it in items]:
        raise SystemExit(f"the saved report of {task} holds other items than this run's; use another --out")
    taken = [name for name in configs if name in kept["logprobs"]]
    for name in taken:
        point = Checkpoint(folder, task, name, configs[name], items)
        if not point.load():
            point.save(kept["logprobs"][name], saved["seconds"][f"{task}/{name}"])
    return taken


def scored_tokens(tok, task: str, limit: int | None = None) -> int:
    """Tokens the scorer feeds the model for the first `limit` eval items of `task` (its rows, all options)."""
    rows, _ = _build_rows(tok, load_task(task, limit=limit))
    return sum(len(r.ids) for r in rows)


def run_model(name: str, args: argparse.Namespace) -> dict:
    """Every task of one model, each saved as it finishes (`<task>.json`: `EvalReport.to_dict()` with per-item
    log-likelihoods); returns {"tasks": {task: that dict}, "profile": the profile's record}."""
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    model, tok = load(name, dtype=torch.float32)
    profile, record = _profile(model, tok, name, args, out)
    check_saved_profile(out, record)
    configs = {"unpatched": None, "act default heads": {"method": "act"}, "act profile": profile}
    added, records = added_profiles(args.add_profile or [])
    configs.update(added)
    record["added"] = {**_saved_record(out).get("added", {}), **records}  # earlier runs' added profiles stay listed
    write_json(os.path.join(out, "profile.json"), record, indent=1)  # what `--summarize` reports without loading it
    if args.configs:  # a share of the work: scored into the checkpoint, where the run with every config finds it
        if unknown := set(args.configs) - set(configs):
            raise SystemExit(f"--configs: no configuration {sorted(unknown)}; this run has {list(configs)}")
        configs = {name: config for name, config in configs.items() if name in args.configs}  # unpatched first
    done = {}
    for task in args.tasks:
        saved = saved_task(out, task)  # done by an earlier run into this folder (a slice has a folder of its own)
        if saved is not None and set(configs) <= set(saved["configs"]):
            done[task] = saved
            continue
        items = load_task(task, limit=args.limit)
        if saved is not None:  # an earlier run's report lacking a configuration of this one: score only that
            taken = seed_checkpoint(saved, task, items, configs, os.path.join(out, "checkpoint"))
            print(f"{name} {task}: {taken} taken from the saved report", flush=True)
        report = evaluate(
            model, tok, {task: items}, configs=configs, limit=args.limit, batch_size=args.batch_size, keep_items=True,
            model_name=name, progress=args.progress, checkpoint=os.path.join(out, "checkpoint"),
        )  # fmt: skip
        if args.configs and not share_reports(list(configs), saved):
            print(f"{name} {task}: {args.configs} saved under {os.path.join(out, 'checkpoint', task)}", flush=True)
            continue
        done[task] = report.to_dict()
        write_json(os.path.join(out, f"{task}.json"), done[task])  # atomic: shares run side by side
        print(f"{name} {task}: {json.dumps({k: round(v, 1) for k, v in report.seconds.items()})}", flush=True)
    tokens = {}
    if args.limit:  # what the slice scored and what the whole eval parts of every default task would
        tokens = {
            "slice": {task: scored_tokens(tok, task, args.limit) for task in args.tasks},
            "whole": {task: scored_tokens(tok, task) for task in TASKS},
        }
    return {"tasks": done, "profile": record, "tokens": tokens}


def share_reports(share: list[str], saved: dict | None) -> bool:
    """Whether a `--configs` share writes its task report (an interim one, which a later run completes): only when it
    has the reference (unpatched) and something to compare with it, and no saved report holds a configuration it
    lacks (that report would lose it)."""
    has_more = saved is not None and not set(saved["configs"]) <= set(share)
    return share[0] == "unpatched" and len(share) > 1 and not has_more


def saved_task(out: str, task: str) -> dict | None:
    """The report an earlier run saved for `task` in the model folder `out`, or None."""
    path = os.path.join(out, f"{task}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_run(name: str, out: str, tasks: list[str]) -> dict | None:
    """The tasks of `tasks` that runs saved for model `name` under the folder `out`, and its profile's record, in
    run_model's form; None when none is saved."""
    out = os.path.join(out, name)
    done = {task: saved for task in tasks if (saved := saved_task(out, task)) is not None}
    if not done:
        return None
    return {"tasks": done, "profile": _refreshed(_saved_record(out)), "tokens": {}}


def _refreshed(record: dict) -> dict:
    """A saved profile record with its calibration read again from the profile's metadata where the profile is
    still on disk (so that a summary follows what the metadata says, e.g. compute seconds over resumed runs)."""
    if not record.get("path") or not os.path.isfile(os.path.join(record["path"], "attnpatch_config.json")):
        return record
    fresh = _record(Profile.load(record["path"]), record["path"], record.get("calibrated_now", False))
    added = {name: _refreshed(r) for name, r in record.get("added", {}).items()}
    return {**record, **fresh, **({"added": added} if added else {})}


def corrected(runs: dict) -> list[dict]:
    """One row per (model, task, config, metric) comparison with unpatched, with Holm and BH over all of them."""
    rows = []
    for model, run in runs.items():
        for task, data in run["tasks"].items():
            for config, result in data["results"][task].items():
                for metric in data["metrics"]:
                    paired = result[metric].get("paired")
                    if paired is not None:
                        rows.append(dict(model=model, task=task, config=config, metric=metric, **paired))
    for metric in {r["metric"] for r in rows}:  # one family per metric: the two metrics ask the same question twice
        family = [r for r in rows if r["metric"] == metric]
        p = [r["p_mcnemar"] for r in family]
        for r, h, b in zip(family, holm(p), benjamini_hochberg(p), strict=True):
            r.update(p_holm_run=h, p_bh_run=b, survives_holm=h < ALPHA, survives_bh=b < ALPHA)
    return rows


def extrapolate(runs: dict) -> dict:
    """Hours the whole eval parts of every default task would take (3 configurations, calibration not included), at
    the seconds per scored token the slice measured (for tasks it ran, their own rate; for the others, the slice's
    overall rate)."""
    out = {}
    for model, run in runs.items():
        if not run["tokens"]:
            continue
        seconds = {task: sum(data["seconds"].values()) for task, data in run["tasks"].items()}
        rate = {task: seconds[task] / run["tokens"]["slice"][task] for task in seconds}
        overall = sum(seconds.values()) / sum(run["tokens"]["slice"].values())
        whole = run["tokens"]["whole"]
        out[model] = {
            "hours": round(sum(rate.get(task, overall) * n for task, n in whole.items()) / 3600, 2),
            "tokens_whole": whole,
            "seconds_per_token": {task: round(r, 6) for task, r in rate.items()},
        }
    return out


def _effect(r: dict) -> str:
    """One comparison as the README's tables give it: Δ in points (95% CI), McNemar p, the correction it survives."""
    lo, hi = r["diff_ci"]
    text = f"{100 * r['diff']:+.1f} ({100 * lo:+.1f}..{100 * hi:+.1f}), p={r['p_mcnemar']:.2g}"
    if r["survives_holm"]:
        return f"**{text}, Holm**"
    return f"{text}, BH only" if r["survives_bh"] else text


def model_tables(summary: dict) -> str:
    """Per model, one row per task: unpatched acc / acc_norm, then each configuration's Δ acc / Δ acc_norm."""
    blocks = []
    for model, tasks in summary["accuracy"].items():
        rows = [r for r in summary["comparisons"] if r["model"] == model]
        configs = list(dict.fromkeys(r["config"] for r in rows))
        lines = [
            f"{model}:",
            "",
            "| task | n | unpatched acc / acc_norm | " + " | ".join(f"{c}: Δ acc / Δ acc_norm" for c in configs) + " |",
            "|---|---|---|" + "---|" * len(configs),
        ]
        for task, accuracy in tasks.items():
            cells = [
                " / ".join(_effect(r) for r in rows if r["task"] == task and r["config"] == c) or "not yet"
                for c in configs
            ]  # fmt: skip
            n = next(r["n"] for r in rows if r["task"] == task)
            base = " / ".join(f"{a:.3f}" for a in accuracy["unpatched"].values())
            lines.append(f"| {task} | {n} | {base} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown(summary: dict) -> str:
    per_metric = len(summary["comparisons"]) // max(len({r["metric"] for r in summary["comparisons"]}), 1)
    lines = [
        f"ACT on {'the first ' + str(summary['limit']) + ' items of ' if summary['limit'] else ''}the eval parts "
        f"({summary['device']}); Holm and BH over the {per_metric} comparisons of each metric.",
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
    lines += ["", "Δ in points, (95% CI), McNemar p; **bold**: survives Holm.", "", model_tables(summary)]
    for model, estimate in summary["full_run_estimate"].items():
        lines.append(
            f"\nWhole eval parts of {', '.join(estimate['tokens_whole'])} for {model} "
            f"({sum(estimate['tokens_whole'].values())} scored tokens), extrapolated per token from this run: "
            f"{estimate['hours']:.1f} h (3 configurations, calibration not included; short rows, as COPA's, cost more "
            "per token than long ones, so a slice of the long tasks, e.g. boolq or hellaswag, estimates better)."
        )
    for model, record in summary["profiles"].items():
        for config, profile in {"act profile": record, **record.get("added", {})}.items():
            if profile.get("seconds") or profile.get("last_run_seconds"):
                items, resumed = profile["calibration_items"], profile.get("resumed")
                took = _calibration_time(profile["seconds"], profile.get("last_run_seconds"), resumed)
                lines.append(
                    f"\n{config} for {model}: calibrated in {took} on {items} calibration items of "
                    f"{profile['calibration_tasks']}; heads {profile['heads']} ({profile['path']})."
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the whole eval part)")
    parser.add_argument("--cal-limit", type=int, default=100, help="calibration items per task (default: 100)")
    parser.add_argument("--screen-layers", type=int, default=None, help="calibrate: screen layers, then heads")
    parser.add_argument("--profile", default=None, help="a profile directory instead of calibrating (one model)")
    parser.add_argument(
        "--add-profile",
        nargs="+",
        metavar="DIR",
        help='more profiles, each scored as the configuration "act profile, <n> items" (one model); the tasks saved '
        "under --out keep their scores and gain this configuration",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=RESULTS, help=f"output folder (default: {RESULTS})")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--configs",
        nargs="+",
        help="score only these configurations into the checkpoint (a second process sharing a task's work); the run "
        "with all of them writes the task (a share with unpatched and another writes an interim one)",
    )
    parser.add_argument(
        "--summarize", action="store_true", help="only rewrite the summary from the tasks saved under --out"
    )
    args = parser.parse_args()
    if (args.profile or args.add_profile) and len(args.models) > 1:
        parser.error("--profile and --add-profile fit one model; give one --models")
    if args.limit and args.out == RESULTS:  # a slice never overwrites (or resumes from) the whole run's files
        args.out = os.path.join(RESULTS, f"limit{args.limit}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.configs:  # a share of a task's work: the run with every configuration writes the task and the summary
        for name in args.models:
            run_model(name, args)
        return
    fresh = {} if args.summarize else {name: run_model(name, args) for name in args.models}
    # the summary covers every task saved under --out, this run's and earlier runs' (other tasks, other models), so
    # a run of one model or a few tasks never drops the rest from it; --summarize covers only --models and --tasks
    models = args.models if args.summarize else list(dict.fromkeys(MODELS + args.models))
    tasks = args.tasks if args.summarize else list(dict.fromkeys(TASKS + args.tasks))
    runs = {name: run for name in models if (run := saved_run(name, args.out, tasks)) is not None}
    for name, run in fresh.items():
        runs.setdefault(name, run)["tokens"] = run["tokens"]  # what a slice scored, for the extrapolation
    summary = {
        "limit": args.limit,
        "tasks": [task for task in tasks if any(task in run["tasks"] for run in runs.values())],
        "device": f"cpu ({platform.machine()})",  # threads differ between the runs a summary covers
        "versions": {"torch": torch.__version__, "attnpatch": attnpatch.__version__},
        "seconds": round(time.perf_counter() - started, 1),
        "scoring_seconds": {
            name: round(sum(sum(d["seconds"].values()) for d in run["tasks"].values()), 1) for name, run in runs.items()
        },
        "profiles": {name: run["profile"] for name, run in runs.items()},
        "accuracy": {
            name: {
                task: {c: {m: r[m]["accuracy"] for m in d["metrics"]} for c, r in d["results"][task].items()}
                for task, d in run["tasks"].items()
            }
            for name, run in runs.items()
        },  # fmt: skip
        "comparisons": corrected(runs),
        "full_run_estimate": extrapolate(runs),
    }
    with open(os.path.join(args.out, "act_full_eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "act_full_eval.md"), "w") as f:
        f.write(markdown(summary) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    main()
