"""Per-item agreement of attnpatch's scorer with lm-evaluation-harness on the same items and model.

    python benchmarks/lm_eval_agreement.py --model gemma-3-270m --tasks arc_easy piqa boolq --limit 40
    python benchmarks/lm_eval_agreement.py --tasks arc_easy piqa --ours-from benchmarks/results/act_full/gemma-3-270m \
        --out benchmarks/results/lm_eval_agreement_gemma-3-270m_whole   # whole eval parts, only lm-eval scores

For each task: our prompts and batched scorer (`option_logprobs` on `load_task(task)`) against lm-eval's
`simple_evaluate` with its default template on the same items (the bundled `attnpatch_<task>` YAML, HFLM on the same
model object). Reports, per task: whether the prompts are the same strings, the largest per-option log-likelihood
difference, and per metric (acc, acc_norm) the number of items where our pick's verdict differs from lm-eval's own
per-sample verdict, plus both accuracies and each harness's time. Writes benchmarks/results/lm_eval_agreement_<model>
.json and .md. With `--ours-from`, our side is read from the unpatched scores `act_full_eval.py` saved for the same
items (same model, fp32, same scorer), so a whole eval part costs only lm-eval's run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from act_full_eval import saved_task

from attnpatch.eval import harness
from attnpatch.eval.metrics import METRICS, pick
from attnpatch.eval.scoring import option_logprobs
from attnpatch.eval.tasks import load_task
from attnpatch.models import load

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def saved_logprobs(folder: str, task: str, items: list, model: str) -> tuple[list[list[float]], float]:
    """Our unpatched per-option log-likelihoods of `items` from a saved report (`<folder>/<task>.json`, as
    `act_full_eval.py` writes them with `keep_items`), and the seconds that scoring took; refused unless the report
    is `model`'s and holds these very items, first to last."""
    saved = saved_task(folder, task)
    if saved is None:
        raise FileNotFoundError(f"no saved report {folder}/{task}.json")
    if saved["model"] != model:
        raise ValueError(f"{folder}/{task}.json holds {saved['model']}'s scores, not {model}'s")
    kept = saved["items"][task]
    ids = [it.id for it in items]
    if kept["ids"][: len(ids)] != ids:
        raise ValueError(f"{folder}/{task}.json scored other items than the first {len(ids)} of {task}'s eval part")
    seconds = saved["seconds"][f"{task}/unpatched"] * len(ids) / len(kept["ids"])
    return kept["logprobs"]["unpatched"][: len(ids)], seconds


def agreement(
    model, tok, task: str, limit: int | None, batch_size: int, ours_from: tuple[str, str] | None = None
) -> dict:
    """Compare both harnesses on the first `limit` eval items of `task` (ours read from a (folder, model name)
    `ours_from`, see `saved_logprobs`, if given)."""
    items = load_task(task, limit=limit)
    started = time.perf_counter()
    if ours_from:
        ours, ours_s = saved_logprobs(ours_from[0], task, items, ours_from[1])
    else:
        ours = option_logprobs(model, tok, items, batch_size=batch_size, progress=False)
        ours_s = time.perf_counter() - started
    name = harness.bundled_name(task)
    started = time.perf_counter()
    report = harness.evaluate_lm_eval(model, tok, [name], limit=limit, batch_size=batch_size, keep_items=True)
    theirs_s = time.perf_counter() - started
    kept = report.items[name]
    assert kept["ids"] == [it.id for it in items], "lm-eval scored other items"
    theirs = kept["logprobs"]["unpatched"]
    diffs = np.abs(np.concatenate(ours) - np.concatenate(theirs))
    row: dict = {"n": len(items), "max_abs_ll_diff": float(diffs.max()), "mean_abs_ll_diff": float(diffs.mean())}
    for metric in METRICS:
        mine = [pick(lp, it.options, metric) == it.label for lp, it in zip(ours, items, strict=True)]
        lm = kept["correct"]["unpatched"][metric]
        row[metric] = {
            "attnpatch": float(np.mean(mine)),
            "lm_eval": float(np.mean(lm)),
            "items_differing": int(sum(a != b for a, b in zip(mine, lm, strict=True))),
        }
    row["seconds"] = {"attnpatch": round(ours_s, 1), "lm_eval": round(theirs_s, 1)}
    return row


def markdown(data: dict) -> str:
    lines = [
        f"Per-item agreement with lm-eval {data['versions']['lm_eval']} ({data['model']}, fp32, 0-shot, "
        f"{data['device']}): items whose verdict differs, accuracies (attnpatch / lm-eval), log-likelihoods.",
        "",
        "| task | n | acc: differing | acc | acc_norm: differing | acc_norm | max abs LL diff | s (ours / lm-eval) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if data.get("ours_from"):
        lines[1:1] = [
            f"attnpatch's log-likelihoods are read from {data['ours_from']} (the same items, model and scorer); its "
            "seconds are that run's, scaled to n, not measured beside lm-eval's.",
        ]
    for task, r in data["tasks"].items():
        a, b = r["acc"], r["acc_norm"]
        lines.append(
            f"| {task} | {r['n']} | {a['items_differing']} | {a['attnpatch']:.4f} / {a['lm_eval']:.4f} | "
            f"{b['items_differing']} | {b['attnpatch']:.4f} / {b['lm_eval']:.4f} | {r['max_abs_ll_diff']:.1e} | "
            f"{r['seconds']['attnpatch']} / {r['seconds']['lm_eval']} |"
        )
    return "\n".join(lines)


def earlier_tasks(path: str, data: dict) -> dict:
    """The tasks of an earlier report at `path` made with the same model, limit, source and versions, so a run adds
    its tasks to it (each task's numbers are replaced when run again); nothing if there is none or it differs."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    same = all(earlier.get(k) == data[k] for k in ("model", "limit", "ours_from", "device", "versions"))
    return earlier["tasks"] if same else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa", "boolq"])
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the whole eval part)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=None, help="output prefix (default: results/lm_eval_agreement_<model>)")
    parser.add_argument(
        "--ours-from",
        default=None,
        help="read our unpatched log-likelihoods from the reports saved in this folder (e.g. "
        "results/act_full/<model>) instead of scoring again; only lm-eval runs",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=torch.float32)
    import lm_eval
    import transformers

    data = {
        "model": args.model,
        "limit": args.limit,
        "ours_from": args.ours_from and os.path.relpath(args.ours_from, os.path.dirname(RESULTS)),
        "device": f"cpu ({platform.machine()}, {args.threads} threads)",
        "versions": dict(lm_eval=lm_eval.__version__, torch=torch.__version__, transformers=transformers.__version__),
        "tasks": {},
    }
    prefix = args.out or os.path.join(RESULTS, f"lm_eval_agreement_{args.model}")
    data["tasks"] = earlier_tasks(prefix + ".json", data)
    for task in args.tasks:
        ours_from = (args.ours_from, args.model) if args.ours_from else None
        data["tasks"][task] = agreement(model, tok, task, args.limit, args.batch_size, ours_from)
        print(task, json.dumps(data["tasks"][task]), flush=True)
    with open(prefix + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(data) + "\n")
    print(markdown(data))


if __name__ == "__main__":
    main()
