"""OCW A/B runner: the same walls under several configurations (unpatched, a patch, a calibrated profile), scored with
the authors' metrics, with paired differences against the first configuration.

Modes: "generate" -- the authors' LLM baseline: greedy generation (at most 144 new tokens) from the notebook's prompts,
parsed into 4x4 groups (task 1) and 4 connections (task 2, given the ground-truth groups); generation of a prompt stops
early once its parse can no longer change. "constrained" -- task 1 only, by the pair log-likelihood solver of
`ocw.solver` (always a valid 4x4 answer). Model output that cannot be parsed is scored as misformatted words, never an
error.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from ..configs import Config, describe, patch_context
from ..runner import SavedReport
from ..scoring import encode_context
from ..stats import bootstrap_ci, paired_comparison
from .metrics import (
    chance_reference,
    connection_metrics,
    grouping_metrics,
    paired_means,
    summarize_connections,
    summarize_grouping,
)
from .solver import example_prefix, pair_scores, solve
from .walls import (
    MAX_NEW_TOKENS,
    Wall,
    connections_done,
    connections_prompt,
    example_walls,
    grouping_done,
    grouping_prompt,
    has_chat_template,
    parse_connections,
    parse_groups,
    word_errors,
)

Mode = Literal["generate", "constrained"]
TASK1_PAIRED = ("correct_groups", "AMI", "ARI", "FMS", "WD")
TASK2_PAIRED = ("exact_match", "rouge1_f1")


@dataclass
class OCWReport(SavedReport):
    """Per configuration: task 1 (and task 2) global metrics, error counts and per-wall records; paired comparisons of
    every other configuration with the first."""

    model: str
    mode: str
    split: str
    shots: int
    walls: list[str]
    configs: dict[str, Any]
    seed: int = 0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)
    chance: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return next(iter(self.configs))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"OCW {self.split}, {len(self.walls)} walls, model {self.model}, mode {self.mode}, {self.shots} shots",
            "",
            *self._task1_table(),
        ]
        if any(r.get("task2") for r in self.results.values()):
            lines += ["", *self._task2_table()]
        lines += ["", *self._paired_table()]
        if self.chance:
            c = self.chance
            lines += [
                "",
                f"Chance (uniformly random partition): {c['correct_groups_per_wall'] * len(self.walls):.3f} correct "
                f"groups in {len(self.walls)} walls ({c['correct_groups_per_wall']:.4f} per wall), solved walls "
                f"{c['full_wall_rate'] * len(self.walls):.1e}, AMI {c['AMI']:.3f}, ARI {c['ARI']:.3f}, "
                f"FMS {c['FMS']:.3f}, WD {c['WD']:.3f} (simulated, n={c['n']}).",
            ]
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _task1_table(self) -> list[str]:
        rows = ["| config | solved | correct groups | AMI | ARI | FMS | WD | misformatted | hallucinated | s |"]
        rows.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in self.results.items():
            t, e = r["task1"], r["errors"]
            rows.append(
                f"| {name} | {t['full_wall']}/{t['walls']} | {t['correct_groups']} | {t['AMI']:.3f} | {t['ARI']:.3f} "
                f"| {t['FMS']:.3f} | {t['WD']:.3f} | {e['misformatted']} | {e['hallucinated']} "
                f"| {self.seconds.get(name, 0):.0f} |"
            )
        return rows

    def _task2_table(self) -> list[str]:
        rows = ["| config | exact match | ROUGE-1 F1 | BERTScore F1 |", "|---|---|---|---|"]
        for name, r in self.results.items():
            t = r["task2"]
            bert = "skipped" if t["bert_score_f1"] is None else f"{t['bert_score_f1']:.3f}"
            rows.append(f"| {name} | {t['exact_match']:.3f} | {t['rouge1_f1']:.3f} | {bert} |")
        return rows

    def _paired_table(self) -> list[str]:
        rows = [
            f"Paired differences vs {self.reference} (config - reference; 95% bootstrap CI over walls; p: sign-flip "
            "permutation test, McNemar for solved walls):",
            "",
            "| config | metric | reference | config | diff | 95% CI | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, metrics in self.paired.items():
            for metric, p in metrics.items():
                a, b = (p["acc_a"], p["acc_b"]) if "acc_a" in p else (p["mean_a"], p["mean_b"])
                lo, hi = p["diff_ci"]
                pval = p.get("p", p.get("p_mcnemar"))
                rows.append(
                    f"| {name} | {metric} | {a:.3f} | {b:.3f} | {p['diff']:+.3f} | {lo:+.3f}..{hi:+.3f} | {pval:.2g} |"
                )
        return rows


# ---------------------------------------------------------------------------------------------------- generation


def _encode(tokenizer, prompt: str) -> list[int]:
    """Prompt ids: a chat-template rendering already holds its special tokens; plain text gets the leading ones."""
    if has_chat_template(tokenizer):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return encode_context(tokenizer, prompt)


class _StopWhen:
    """Stopping criterion: a row is finished once `done(decoded new text)` holds."""

    def __init__(self, tokenizer, start: int, done: Callable[[str], bool]):
        self.tokenizer, self.start, self.done = tokenizer, start, done

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([self.done(t) for t in texts], device=input_ids.device)


def _greedy_config(model, max_new_tokens: int, pad_id: int):
    """Plain greedy decoding, whatever sampling or penalty defaults the model's generation_config carries."""
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos
    )


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    done: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches, longest first); a row stops at EOS, after
    `max_new_tokens`, or once `done(text)` holds."""
    from transformers import StoppingCriteriaList

    encoded = [_encode(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    config = _greedy_config(model, max_new_tokens, pad_id)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        stop = StoppingCriteriaList([_StopWhen(tokenizer, width, done)] if done else [])
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=config, stopping_criteria=stop)
        for row, i in enumerate(batch):
            texts[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return texts


# ---------------------------------------------------------------------------------------------------- one config


def _grouping_records(walls: Sequence[Wall], clue_lists, predictions, raw) -> list[dict[str, Any]]:
    records = []
    for wall, clues, groups, text in zip(walls, clue_lists, predictions, raw, strict=True):
        record = {"wall_id": wall.wall_id, "predicted_groups": groups, **word_errors(groups, clues)}
        record.update(grouping_metrics(groups, wall.groups))
        if text is not None:
            record["output"] = text
        records.append(record)
    return records


def records_from_outputs(
    walls: Sequence[Wall],
    clue_lists: Sequence[Sequence[str]],
    grouping_outputs: Sequence[str],
    connection_outputs: Sequence[str] | None = None,
    bert: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Per-wall records (parsed answers, error counts, metrics) and the task 2 summary from model output text."""
    predictions = [parse_groups(t, clues) for t, clues in zip(grouping_outputs, clue_lists, strict=True)]
    records = _grouping_records(walls, clue_lists, predictions, grouping_outputs)
    if connection_outputs is None:
        return records, None
    for record, wall, text in zip(records, walls, connection_outputs, strict=True):
        connections = parse_connections(text)
        metrics = connection_metrics(connections, wall.connections, bert=bert)
        record.update(predicted_connections=connections, connections_output=text, task2=metrics)
    return records, summarize_connections([r["task2"] for r in records])


def _result(records: list[dict[str, Any]], task2: dict[str, Any] | None) -> dict[str, Any]:
    solved = [float(r["full_wall"]) for r in records]
    return {
        "task1": {**summarize_grouping(records), "solved_ci": bootstrap_ci(solved)},
        "task2": task2,
        "errors": {k: sum(r[k] for r in records) for k in ("misformatted", "hallucinated")},
        "per_wall": records,
    }


def _run_config(model, tokenizer, walls, clue_lists, prompts, *, mode: Mode, prefix: str, batch_size: int,
                max_new_tokens: int, bert: bool) -> dict[str, Any]:  # fmt: skip
    """Predictions and metrics of one (already applied) configuration."""
    if mode == "constrained":
        matrices = pair_scores(model, tokenizer, clue_lists, prefix=prefix, batch_size=batch_size)
        predictions = [solve(clues, m) for clues, m in zip(clue_lists, matrices, strict=True)]
        return _result(_grouping_records(walls, clue_lists, predictions, [None] * len(walls)), None)
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    grouping = generate_texts(model, tokenizer, prompts["grouping"], done=grouping_done, **gen)
    connections = None
    if prompts.get("connections"):
        connections = generate_texts(model, tokenizer, prompts["connections"], done=connections_done, **gen)
    return _result(*records_from_outputs(walls, clue_lists, grouping, connections, bert))


def _paired(reference: dict[str, Any], other: dict[str, Any], seed: int) -> dict[str, Any]:
    a, b = reference["per_wall"], other["per_wall"]
    out: dict[str, Any] = {
        "solved": paired_comparison([r["full_wall"] for r in a], [r["full_wall"] for r in b], seed=seed)
    }
    for key in TASK1_PAIRED:
        out[key] = paired_means([float(r[key]) for r in a], [float(r[key]) for r in b], seed=seed)
    if reference["task2"] and other["task2"]:
        for key in TASK2_PAIRED:
            out[key] = paired_means([r["task2"][key] for r in a], [r["task2"][key] for r in b], seed=seed)
    return out


def _pair_all(report: OCWReport) -> None:
    reference = report.results[report.reference]
    report.paired = {
        name: _paired(reference, result, report.seed)
        for name, result in report.results.items()
        if name != report.reference
    }


# ---------------------------------------------------------------------------------------------------- A/B


def evaluate_ocw(
    model,
    tokenizer,
    walls: Sequence[Wall],
    *,
    configs: Mapping[str, Config] | None = None,
    mode: Mode = "generate",
    train: Sequence[Wall] = (),
    shots: int = 3,
    connections: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    bert: bool = False,
    model_name: str = "",
    split: str = "validation",
    chance_samples: int | None = None,
    progress: bool = True,
) -> OCWReport:
    """Score every configuration on the same walls; the first configuration is the reference of the paired tests.

    configs: {name: None (unpatched) | {"method": "act", **options} | Profile} (default: unpatched only). The k
    `shots` walls come from `train` (`example_walls`, seed 42); clues are shown in `Wall.clues(seed)` order.
    generate mode runs task 1 and, with `connections`, task 2; constrained mode runs task 1 only. batch_size: prompts
    per generate() call (default 8) or scored sequences per forward in constrained mode (default 64). The report
    carries the random-partition reference (`chance_reference(chance_samples)`; None: the stored one; 0: none).
    """
    if mode not in ("generate", "constrained"):
        raise ValueError(f"mode must be 'generate' or 'constrained', not {mode!r}")
    configs = dict(configs or {"unpatched": None})
    examples = example_walls(train, shots)
    clue_lists = [wall.clues(seed) for wall in walls]
    prompts: dict[str, list[str]] = {}
    if mode == "generate":
        prompts["grouping"] = [grouping_prompt(w, examples, tokenizer, seed) for w in walls]
        if connections:
            prompts["connections"] = [connections_prompt(w, examples, tokenizer) for w in walls]
    report = OCWReport(
        model=model_name or type(model).__name__,
        mode=mode,
        split=split,
        shots=shots,
        walls=[w.wall_id for w in walls],
        configs={name: describe(c) for name, c in configs.items()},
        seed=seed,
        chance=chance_reference(chance_samples) if chance_samples != 0 else {},
    )
    for name, config in configs.items():
        started = time.perf_counter()
        if progress:
            print(f"ocw {mode}: {name} on {len(walls)} walls", flush=True)
        with patch_context(model, config):
            report.results[name] = _run_config(
                model, tokenizer, walls, clue_lists, prompts, mode=mode, prefix=example_prefix(examples),
                batch_size=batch_size or (64 if mode == "constrained" else 8), max_new_tokens=max_new_tokens,
                bert=bert,
            )  # fmt: skip
        report.seconds[name] = time.perf_counter() - started
    report.notes += _notes(report, examples, walls)
    _pair_all(report)
    return report


def rescore(data: Mapping[str, Any], walls: Sequence[Wall], *, bert: bool = False) -> OCWReport:
    """Parse and score again the model output stored in a generate-mode report (`OCWReport.to_dict()`), e.g. after a
    parser change; no model runs. `walls` must hold the report's walls."""
    if data["mode"] != "generate":
        raise ValueError("only generate-mode reports store model output to rescore")
    by_id = {w.wall_id: w for w in walls}
    missing = [i for i in data["walls"] if i not in by_id]
    if missing:
        raise ValueError(f"walls {missing} of the report are not among the given walls")
    chosen = [by_id[i] for i in data["walls"]]
    fields = ("model", "mode", "split", "shots", "walls", "configs", "seed", "chance", "seconds", "notes")
    report = OCWReport(**{k: copy.deepcopy(data[k]) for k in fields if k in data})
    clue_lists = [w.clues(report.seed) for w in chosen]
    for name, result in data["results"].items():
        rows = result["per_wall"]
        connections = [r["connections_output"] for r in rows] if result["task2"] else None
        records, task2 = records_from_outputs(chosen, clue_lists, [r["output"] for r in rows], connections, bert)
        report.results[name] = _result(records, task2)
    _pair_all(report)
    return report


def _notes(report: OCWReport, examples: Sequence[Wall], walls: Sequence[Wall]) -> list[str]:
    notes = []
    if report.mode == "constrained":
        notes.append("constrained mode: task 1 only (pair log-likelihoods + exact partition search); task 2 is given "
                     "the ground-truth groups and runs in generate mode")  # fmt: skip
    if any(r["task2"] and r["task2"]["bert_score_f1"] is None for r in report.results.values()):
        notes.append("BERTScore skipped (not requested, or bert_score and its model are not available offline)")
    overlap = {w.wall_id for w in examples} & {w.wall_id for w in walls}
    if overlap:
        notes.append(f"in-context examples include evaluated walls: {sorted(overlap)}")
    return notes
