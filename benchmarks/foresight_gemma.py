"""Foresight fine-tuning (Merlin FPT/FIT) with Gemma-3 270M on serialised observations, CPU-sized.

    python benchmarks/foresight_gemma.py --seeds 0 1 2 --steps 30 --batch-size 4 --train-size 150 --test-size 80
    # or one process per seed (--seeds 0 --out /tmp/s0, ...), then: --merge /tmp/s0.json /tmp/s1.json /tmp/s2.json

Scenes (defaults): 2 subjects, 2 observed frames, 2 future frames (constant acceleration plus jitter), questions
about the future (reach a region, meet, which leaves first), balanced answers. Per seed (data and LoRA init), equal
budgets of optimiser steps and batch size:
  (a) answer-only fine-tuning ("Answer: X");
  (b) FIT, trajectory first ("Trajectories: <relevant subjects' future boxes>\\nAnswer: X");
  (c) FPT (track one subject / track all, from the same training scenes) for half the steps, then FIT.
Evaluated on the same held-out test questions by greedy decoding over the targets' token set: answer accuracy, parse
rate, ADE/FDE/IoU of the trajectories (b) and (c) write vs the constant-velocity baseline on the same trajectories.
Results: benchmarks/results/foresight_gemma.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from typing import Any

import numpy as np
import torch

from attnpatch.adapters.foresight import (
    ForesightAdapter,
    collate,
    constant_velocity,
    encode,
    fpt_tasks,
    make_splits,
    mean_ci,
    parse_response,
    question_task,
    scene_tracks,
    score_tracks,
    summarise,
    target_vocabulary,
)

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MODEL = "gemma-3-270m"
VARIANTS = {"answer": "(a) answer-only", "fit": "(b) FIT trajectory-first", "fpt_fit": "(c) FPT then FIT"}


def batches(rows, batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled right-padded batches."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([rows[j] for j in order[i : i + batch_size]], pad_id)


def count_tokens(rows) -> dict[str, int]:
    return {
        "tokens": sum(len(r.input_ids) for r in rows),
        "target_tokens": sum(sum(t != -100 for t in r.labels) for r in rows),
    }


def budget_rows(stream, steps: int) -> tuple[list, list]:
    """Draw `steps` batches from `stream`; returns the batches and a token count."""
    out = [next(stream) for _ in range(steps)]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in out))
    targets = int(sum(int((b["labels"] != -100).sum()) for b in out))
    return out, [tokens, targets]


def evaluate(adapter, tokenizer, tests, kind: str, args) -> dict[str, Any]:
    """Greedy answers (and trajectories) on the test questions; per-item records for bootstrap intervals."""
    tasks = [question_task(scene, q, kind) for scene, q in tests]
    rows = [encode(t, tokenizer, with_target=False) for t in tasks]
    target_len = max(len(encode(t, tokenizer).labels) - len(r.input_ids) for t, r in zip(tasks, rows, strict=True))
    max_new = target_len + 4
    records = []
    t0 = time.perf_counter()
    for i in range(0, len(rows), args.eval_batch_size):
        chunk = rows[i : i + args.eval_batch_size]
        texts = adapter.generate(collate(chunk, tokenizer.pad_token_id, side="left"), tokenizer, max_new_tokens=max_new)
        for task, text in zip(tasks[i : i + len(chunk)], texts, strict=True):
            response = parse_response(text)
            scene, q = task.scene, task.question
            rec: dict[str, Any] = {
                "kind": q.kind,
                "truth": q.answer,
                "answer": response.answer,
                "correct": int(response.answer == q.answer),
                "text": text,
            }
            if kind == "fit":
                truth = scene_tracks(scene, task.subjects, scene.future())
                parsed = response.trajectories
                rec["parsed"] = bool(parsed is not None and parsed.ok and response.answer is not None)
                model_scores = score_tracks(parsed.tracks if parsed else None, truth)
                cv_scores = score_tracks(constant_velocity(scene, task.subjects), truth)
                rec["trajectories"] = [
                    {"ade": m.ade, "fde": m.fde, "cv_ade": c.ade, "cv_fde": c.fde, "ious": m.ious, "cv_ious": c.ious,
                     "expected": m.expected, "predicted": m.predicted}
                    for m, c in zip(model_scores, cv_scores, strict=True)
                ]  # fmt: skip
                rec["_scores"] = (model_scores, cv_scores)
            else:
                rec["parsed"] = response.answer is not None
            records.append(rec)
    eval_s = time.perf_counter() - t0
    correct = [r["correct"] for r in records]
    out: dict[str, Any] = {
        "accuracy": float(np.mean(correct)),
        "accuracy_ci95": mean_ci(correct),
        "parse_rate": float(np.mean([r["parsed"] for r in records])),
        "answer_missing": sum(r["answer"] is None for r in records),
        "by_kind": {
            k: float(np.mean([r["correct"] for r in records if r["kind"] == k]))
            for k in sorted({r["kind"] for r in records})
        },
        "eval_s": round(eval_s, 1),
        "max_new_tokens": max_new,
    }
    if kind == "fit":
        model_scores = [s for r in records for s in r["_scores"][0]]
        cv_scores = [s for r in records for s in r["_scores"][1]]
        both = list(zip(model_scores, cv_scores, strict=True))  # pairs where model and baseline both have a value
        paired = [(m.ade, c.ade) for m, c in both if m.ade is not None and c.ade is not None]
        paired_f = [(m.fde, c.fde) for m, c in both if m.fde is not None and c.fde is not None]
        out["trajectories"] = {
            "model": summarise(model_scores),
            "constant_velocity_all": summarise(cv_scores),
            "ade_model_ci95": mean_ci([m for m, _ in paired]),
            "ade_cv_same_trajectories": float(np.mean([c for _, c in paired])) if paired else float("nan"),
            "ade_diff_model_minus_cv_ci95": mean_ci([m - c for m, c in paired]),
            "fde_model_ci95": mean_ci([m for m, _ in paired_f]),
            "fde_cv_same_trajectories": float(np.mean([c for _, c in paired_f])) if paired_f else float("nan"),
            "fde_diff_model_minus_cv_ci95": mean_ci([m - c for m, c in paired_f]),
        }
    for r in records:
        r.pop("_scores", None)
    out["samples"] = [{k: r[k] for k in ("truth", "answer", "text")} for r in records[:4]]
    out["records"] = [{k: v for k, v in r.items() if k != "text"} for r in records]
    return out


def run_seed(model, tokenizer, seed: int, args) -> dict[str, Any]:
    scene = {"subjects": args.subjects, "observed": args.observed, "future": args.future}
    splits = make_splits(seed, {"train": args.train_size, "test": args.test_size}, **scene)
    train, tests = splits["train"], splits["test"]
    enc = {
        "answer": [encode(question_task(s, q, "answer"), tokenizer) for s, q in train],
        "fit": [encode(question_task(s, q, "fit"), tokenizer) for s, q in train],
        "fpt": [encode(t, tokenizer) for t in fpt_tasks([s for s, _ in train])],
    }
    digits = [i for d in "0123456789" for i in tokenizer.encode(d, add_special_tokens=False)]
    vocab = target_vocabulary([r for rows in enc.values() for r in rows], [*digits, tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id
    out: dict[str, Any] = {"vocabulary_size": len(vocab), "train_questions": len(train), "test_questions": len(tests)}
    for variant in args.variants:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        if variant == "fpt_fit":
            half = args.steps // 2
            stages = [("fpt", half), ("fit", args.steps - half)]
        else:
            stages = [(variant, args.steps)]
        adapter = ForesightAdapter(model, lora_r=8, lora_alpha=16, lora_layers=tuple(args.lora_layers))
        adapter.restrict_vocabulary(vocab)
        losses, tokens, t0 = [], [0, 0], time.perf_counter()
        # one optimiser per stage (a fresh AdamW for FIT after FPT, as a separate fine-tuning stage)
        for stage, steps in stages:
            data, counted = budget_rows(batches(enc[stage], args.batch_size, pad, rng), steps)
            tokens = [tokens[0] + counted[0], tokens[1] + counted[1]]

            def log(step, loss, stage=stage, variant=variant, t0=t0):
                if step % args.log_every == 0:
                    elapsed = time.perf_counter() - t0
                    print(f"  seed {seed} {variant}/{stage} step {step}: loss {loss:.3f} ({elapsed:.0f} s)", flush=True)

            losses += adapter.fit(iter(data), steps=steps, lr=args.lr, log=log)
        train_s = time.perf_counter() - t0
        result = {
            "train": {
                "steps": len(losses),
                "stages": stages,
                "tokens": tokens[0],
                "target_tokens": tokens[1],
                "loss_first5": float(np.mean(losses[:5])),
                "loss_last5": float(np.mean(losses[-5:])),
                "losses": [round(x, 4) for x in losses],
                "train_s": round(train_s, 1),
            },
            "eval": evaluate(adapter, tokenizer, tests, "answer" if variant == "answer" else "fit", args),
        }
        adapter.detach()
        ev = result["eval"]
        msg = f"seed {seed} {variant}: acc {ev['accuracy']:.2f} parse {ev['parse_rate']:.2f}"
        if "trajectories" in ev:
            tr = ev["trajectories"]
            msg += f" ADE {tr['model']['ade']:.3f} (CV {tr['ade_cv_same_trajectories']:.3f})"
        print(msg + f" train {train_s:.0f}s eval {ev['eval_s']:.0f}s", flush=True)
        out[variant] = result
    return out


def pooled(report: dict[str, Any]) -> dict[str, Any]:
    """Across seeds: mean of per-seed figures and a bootstrap interval over all test items of all seeds."""
    table: dict[str, Any] = {}
    seeds = report["seeds"]
    for variant in report["config"]["variants"]:
        per = [report["per_seed"][str(s)][variant]["eval"] for s in seeds]
        items = [r for ev in per for r in ev["records"]]
        row: dict[str, Any] = {
            "accuracy_per_seed": [ev["accuracy"] for ev in per],
            "accuracy_mean": float(np.mean([ev["accuracy"] for ev in per])),
            "accuracy_ci95_items": mean_ci([r["correct"] for r in items]),
            "parse_rate_mean": float(np.mean([ev["parse_rate"] for ev in per])),
        }
        if variant != "answer":
            trajs = [t for r in items for t in r["trajectories"]]
            with_ade = [t for t in trajs if t["ade"] is not None and t["cv_ade"] is not None]
            with_fde = [t for t in trajs if t["fde"] is not None and t["cv_fde"] is not None]
            row.update(
                {
                    "ade_per_seed": [ev["trajectories"]["model"]["ade"] for ev in per],
                    "ade": float(np.mean([t["ade"] for t in with_ade])) if with_ade else float("nan"),
                    "ade_ci95": mean_ci([t["ade"] for t in with_ade]),
                    "cv_ade_same": float(np.mean([t["cv_ade"] for t in with_ade])) if with_ade else float("nan"),
                    "ade_diff_ci95": mean_ci([t["ade"] - t["cv_ade"] for t in with_ade]),
                    "fde": float(np.mean([t["fde"] for t in with_fde])) if with_fde else float("nan"),
                    "fde_ci95": mean_ci([t["fde"] for t in with_fde]),
                    "cv_fde_same": float(np.mean([t["cv_fde"] for t in with_fde])) if with_fde else float("nan"),
                    "fde_diff_ci95": mean_ci([t["fde"] - t["cv_fde"] for t in with_fde]),
                    "coverage": sum(t["predicted"] for t in trajs) / max(1, sum(t["expected"] for t in trajs)),
                    "cv_ade_all": float(np.mean([t["cv_ade"] for t in trajs if t["cv_ade"] is not None])),
                    "cv_fde_all": float(np.mean([t["cv_fde"] for t in trajs if t["cv_fde"] is not None])),
                }
            )
        table[variant] = row
    return table


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(report: dict[str, Any]) -> str:
    cfg, table = report["config"], report["pooled"]
    lines = [
        "# Foresight (Merlin FPT/FIT) on serialised observations (Gemma-3 270M)",
        "",
        f"Device: {report['device']}; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}, peft {report['versions']['peft']}; generated by "
        f"`benchmarks/foresight_gemma.py`; total {report['total_s']:.0f} s.",
        "",
        f"Seeds {report['seeds']} (data and LoRA init); per seed {cfg['train_size']} training / "
        f"{cfg['test_size']} test questions; {cfg['steps']} steps x batch {cfg['batch_size']} for every variant "
        "(FPT then FIT: half each), "
        f"LoRA r=8 on q_proj/v_proj of layers {cfg['lora_layers'][0]}-{cfg['lora_layers'][-1]}, AdamW lr {cfg['lr']}; "
        "loss and greedy decoding over the targets' token set. 95% intervals: percentile bootstrap over the test "
        "items of all seeds.",
        "",
        "| variant | answer accuracy (per seed) | 95% CI | parse rate | ADE | CV ADE (same) | ADE - CV 95% CI | FDE "
        "| CV FDE (same) | FDE - CV 95% CI | box coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        acc = ", ".join(f"{a:.2f}" for a in row["accuracy_per_seed"])
        line = (
            f"| {VARIANTS[variant]} | {row['accuracy_mean']:.3f} ({acc}) | {fmt_ci(row['accuracy_ci95_items'])} | "
            f"{row['parse_rate_mean']:.2f} |"
        )
        if "ade" in row:
            line += (
                f" {row['ade']:.3f} | {row['cv_ade_same']:.3f} | {fmt_ci(row['ade_diff_ci95'])} | {row['fde']:.3f} | "
                f"{row['cv_fde_same']:.3f} | {fmt_ci(row['fde_diff_ci95'])} | {row['coverage']:.2f} |"
            )
        else:
            line += " - | - | - | - | - | - | - |"
        lines.append(line)
    train = {v: [report["per_seed"][str(s)][v]["train"] for s in report["seeds"]] for v in cfg["variants"]}
    lines += ["", "| variant | tokens / target tokens per run (mean) | loss first5 -> last5 (mean) | train s (mean) |"]
    lines += ["|---|---|---|---|"]
    for v, runs in train.items():
        lines.append(
            f"| {VARIANTS[v]} | {np.mean([r['tokens'] for r in runs]):.0f} / "
            f"{np.mean([r['target_tokens'] for r in runs]):.0f} | {np.mean([r['loss_first5'] for r in runs]):.2f} -> "
            f"{np.mean([r['loss_last5'] for r in runs]):.2f} | {np.mean([r['train_s'] for r in runs]):.0f} |"
        )
    lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: str) -> None:
    report["pooled"] = pooled(report)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with open(out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


def merge(paths: list[str], out: str) -> None:
    """One report from runs of the same configuration over different seeds (run in parallel processes)."""
    reports = [json.load(open(p)) for p in paths]
    merged = dict(reports[0])
    merged["seeds"] = [s for r in reports for s in r["seeds"]]
    merged["per_seed"] = {k: v for r in reports for k, v in r["per_seed"].items()}
    merged["config"] = {**reports[0]["config"], "seeds": merged["seeds"]}
    for r in reports[1:]:
        differ = {k for k in r["config"] if k != "seeds" and r["config"][k] != reports[0]["config"][k]}
        if differ:
            raise ValueError(f"{paths}: the runs differ in {sorted(differ)}")
    merged["total_s"] = max(r["total_s"] for r in reports)
    merged["runs"] = [{"seeds": r["seeds"], "total_s": r["total_s"]} for r in reports]
    merged["device"] += f"; the seeds ran as {len(reports)} processes at once"
    write(merged, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-layers", type=int, nargs="+", default=list(range(9, 18)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--observed", type=int, default=2)
    parser.add_argument("--future", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=os.path.join(RESULTS, "foresight_gemma"))
    parser.add_argument("--merge", nargs="+", help="combine the JSON reports of runs over other seeds into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    import peft
    import transformers

    from attnpatch.models import load

    model, tokenizer = load(MODEL, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    per_seed = {}
    for seed in args.seeds:
        per_seed[str(seed)] = run_seed(model, tokenizer, seed, args)
    report: dict[str, Any] = {
        "task": f"future-event questions about {args.subjects}-subject scenes given as serialised boxes "
        f"({args.observed} observed, {args.future} future frames)",
        "model": MODEL,
        "dtype": "float32",
        "device": f"CPU ({os.cpu_count()} cores shared with other jobs), {args.threads} torch threads",
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "seeds": args.seeds,
        "per_seed": per_seed,
        "notes": [
            "Equal budgets: the same number of optimiser steps and batch size for every variant; trajectory-first "
            "targets are longer, so (b) and (c) see more target tokens (counts in the second table).",
            "FPT uses the training questions' scenes (no extra data): per scene one 'track <idN>' task per subject "
            "and one 'track all' task; FPT then FIT starts a fresh AdamW for the FIT stage.",
            "ADE/FDE: box-centre displacement in normalised units over the future frames where the truth is in view "
            "and the model wrote a box; 'CV (same)' is the constant-velocity baseline on those same trajectories; "
            "a negative ADE - CV interval means the model beats the baseline.",
            "Parse rate: answers only for (a); for (b)/(c) the whole response (trajectories and answer) must parse.",
            "Chance: yes/no questions 0.5, 'which leaves first' 1/3 (each subject or none), balanced per kind.",
        ],
    }
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    write(report, args.out)


if __name__ == "__main__":
    main()
