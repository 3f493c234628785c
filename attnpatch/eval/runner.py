"""A/B evaluation: several configurations (unpatched, a method with options, a calibrated profile) scored on the same
items of several tasks, under lm-eval's two metrics (`acc`, `acc_norm`), with bootstrap intervals and paired tests
against the first configuration (McNemar p, Holm-adjusted over the report).

Under `accelerate launch` each process scores a shard of every task's items and the per-item results are gathered,
so the report is the same as a single-process run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..distributed import Processes
from .configs import Config, describe, fingerprint, patch_context
from .metrics import DESCRIPTIONS, METRICS, check_metrics, pick
from .scoring import option_logprobs
from .stats import bootstrap_ci, holm, paired_comparison
from .tasks import Item, load_task


class SavedReport:
    """A report that writes itself as JSON (`to_dict`) and markdown (`to_markdown`)."""

    def to_dict(self) -> dict:
        raise NotImplementedError

    def to_markdown(self) -> str:
        raise NotImplementedError

    def save(self, prefix: str) -> tuple[str, str]:
        """Write `<prefix>.json` and `<prefix>.md`; returns both paths."""
        with open(prefix + ".json", "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        with open(prefix + ".md", "w", encoding="utf-8") as f:
            f.write(self.to_markdown() + "\n")
        return prefix + ".json", prefix + ".md"


@dataclass
class EvalReport(SavedReport):
    """Per task, configuration and metric (`acc`, `acc_norm`, see `metrics`): accuracy, its 95% bootstrap interval,
    and the paired comparison with the first configuration (diff, its interval, McNemar p, and p_holm: Holm's
    adjustment over every comparison of that metric in the report).

    results[task][config] = {"n": n, metric: {"accuracy", "ci", "paired"}}; `items[task]`, when kept, holds the item
    ids, labels and every configuration's per-option log-likelihoods (lm-eval's harness: its per-item metrics)."""

    model: str
    configs: dict[str, Any]
    tasks: list[str]
    shots: int
    part: str
    limit: int | None
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    harness: str = "attnpatch"
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        model,
        model_name: str,
        configs: Mapping[str, Config],
        tasks: Sequence[str],
        *,
        shots: int,
        part: str,
        limit: int | None,
        metrics: Sequence[str],
        harness: str = "attnpatch",
    ) -> EvalReport:
        """An empty report for one run: configurations described, metrics checked, the model named (its class
        when `model_name` is empty)."""
        return cls(
            model=model_name or type(model).__name__,
            configs={name: describe(c) for name, c in configs.items()},
            tasks=list(tasks),
            shots=shots,
            part=part,
            limit=limit,
            metrics=list(check_metrics(metrics)),
            harness=harness,
        )

    @property
    def reference(self) -> str:
        return next(iter(self.configs))

    def average(self, config: str, metric: str = "acc_norm") -> float:
        """Unweighted mean accuracy over the tasks."""
        return sum(self.results[t][config][metric]["accuracy"] for t in self.tasks) / len(self.tasks)

    def add(self, task: str, correct: Mapping[str, Mapping[str, Sequence[bool]]], seed: int = 0) -> None:
        """Summarise one task from per-item correctness, correct[config][metric], paired with the first config."""
        self.results[task] = {}
        for name, by_metric in correct.items():
            row: dict[str, Any] = {"n": len(next(iter(by_metric.values())))}
            for metric in self.metrics:
                values = list(by_metric[metric])
                cell: dict[str, Any] = {"accuracy": sum(values) / len(values), "ci": bootstrap_ci(values, seed=seed)}
                if name != self.reference:
                    cell["paired"] = paired_comparison(correct[self.reference][metric], values, seed=seed)
                row[metric] = cell
            self.results[task][name] = row
        self._adjust()

    def _adjust(self) -> None:
        for metric in self.metrics:
            cells = [
                row[metric]["paired"]
                for task in self.results.values()
                for row in task.values()
                if "paired" in row[metric]
            ]
            for cell, p in zip(cells, holm([c["p_mcnemar"] for c in cells]), strict=True):
                cell["p_holm"] = p

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["average"] = {m: {name: self.average(name, m) for name in self.configs} for m in self.metrics}
        data["metric_definitions"] = {m: DESCRIPTIONS[m] for m in self.metrics}
        return data

    def table(self, metric: str) -> str:
        """One markdown table of `metric`: accuracy per task and config, with the paired comparison."""
        names = list(self.configs)
        lines = ["| task | n | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
        for task in self.tasks:
            cells = []
            for name in names:
                r = self.results[task][name][metric]
                cell = f"{r['accuracy']:.3f}"
                if name != self.reference:
                    p = r["paired"]
                    lo, hi = p["diff_ci"]
                    cell += (
                        f" ({100 * p['diff']:+.1f}, CI {100 * lo:+.1f}..{100 * hi:+.1f}, p={p['p_mcnemar']:.2g}, "
                        f"Holm {p['p_holm']:.2g})"
                    )
                cells.append(cell)
            lines.append(f"| {task} | {self.results[task][names[0]]['n']} | " + " | ".join(cells) + " |")
        lines.append("| average | | " + " | ".join(f"{self.average(n, metric):.3f}" for n in names) + " |")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        blocks = [f"**{m}** ({DESCRIPTIONS[m]}; {self.harness})\n\n{self.table(m)}" for m in self.metrics]
        return "\n\n".join(blocks)


@dataclass
class Checkpoint:
    """One (task, configuration)'s per-item log-likelihoods on disk, `<folder>/<task>/<config>.json`; what is loaded
    must come from the same configuration (`configs.fingerprint`) and the same prompts and options (few-shot ones
    included), else it is scored again. The model is not checked: one folder per model."""

    folder: str | os.PathLike
    task: str
    name: str
    config: Config
    items: Sequence[Item]
    logprobs: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def path(self) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        return Path(self.folder) / self.task / f"{safe}.json"

    def _key(self) -> dict[str, Any]:
        prompts = json.dumps([[it.id, it.context, list(it.options)] for it in self.items])
        return {"config": fingerprint(self.config), "items": hashlib.sha256(prompts.encode()).hexdigest()}

    def load(self) -> bool:
        """Read the saved log-likelihoods if they match; False when there are none or they do not."""
        if not self.path.is_file():
            return False
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if data.get("key") != self._key():
            return False
        self.logprobs, self.seconds = data["logprobs"], data["seconds"]
        return True

    def save(self, logprobs: list[list[float]], seconds: float) -> None:
        write_json(self.path, {"key": self._key(), "logprobs": logprobs, "seconds": seconds})
        self.partial_path.unlink(missing_ok=True)

    @property
    def partial_path(self) -> Path:
        """Where an unfinished pass keeps the batches it has scored (`<config>.partial.json`)."""
        return self.path.with_name(self.path.stem + ".partial.json")

    def load_partial(self, batch_size: int) -> tuple[list[list[float]], float]:
        """The values of the batches an interrupted pass scored and its seconds, if it scored the same items in the
        same batches under the same configuration; else nothing."""
        if not self.partial_path.is_file():
            return [], 0.0
        data = json.loads(self.partial_path.read_text(encoding="utf-8"))
        if data.get("key") != {**self._key(), "batch_size": batch_size}:
            return [], 0.0
        return data["batches"], data["seconds"]

    def save_partial(self, batches: list[list[float]], seconds: float, batch_size: int) -> None:
        key = {**self._key(), "batch_size": batch_size}
        write_json(self.partial_path, {"key": key, "batches": batches, "seconds": seconds})


def write_json(path: str | Path, data: dict[str, Any], indent: int | None = None) -> None:
    """Write JSON through a temporary file, so a reader (another process too) never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent), encoding="utf-8")
    tmp.replace(path)


class _Progress:
    """Saves a pass's scored batches to its checkpoint at most every `every` seconds (`option_logprobs(on_batch=)`)."""

    def __init__(self, checkpoint: Checkpoint, batch_size: int, seconds_before: float, every: float):
        self.checkpoint, self.batch_size, self.every = checkpoint, batch_size, every
        self.started = self.last = time.perf_counter()
        self.seconds_before = seconds_before

    @property
    def seconds(self) -> float:
        """Seconds of scoring, the interrupted passes' included."""
        return self.seconds_before + time.perf_counter() - self.started

    def __call__(self, batches: list[list[float]]) -> None:
        if time.perf_counter() - self.last >= self.every:
            self.checkpoint.save_partial(batches, self.seconds, self.batch_size)
            self.last = time.perf_counter()


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] | Mapping[str, Sequence[Item]],
    *,
    configs: Mapping[str, Config] | None = None,
    shots: int = 0,
    limit: int | None = None,
    part: str = "eval",
    seed: int = 0,
    batch_size: int = 16,
    metrics: Sequence[str] = METRICS,
    keep_items: bool = False,
    model_name: str = "",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    save_every: float = 60.0,
) -> EvalReport:
    """Score every configuration on the same items of every task (the `part` of each, see `load_task`).

    configs: {name: None (unpatched) | {"method": "act", **options} | Profile}; the first is the reference of the
    paired comparisons (default: just the unpatched model). tasks: names, or {name: items} for your own items.
    Each configuration's log-likelihoods are computed once and every metric of `metrics` is read from them;
    `keep_items` stores them, with the item ids and labels, in `report.items`. With `checkpoint` (a folder) each
    (task, configuration)'s log-likelihoods are saved as soon as they are scored, and a rerun reuses those of the same
    configuration on the same items, so a long evaluation stopped midway resumes where it stopped; within one
    (task, configuration) the batches scored so far are saved every `save_every` seconds (one process only; under
    `accelerate launch` a configuration is saved when it finishes), and a rerun with the same `batch_size` scores only
    the batches after them, with the same results as an uninterrupted pass.
    """
    configs = dict(configs or {"unpatched": None})
    processes = Processes()
    report = EvalReport.start(
        model, model_name, configs, list(tasks), shots=shots, part=part, limit=limit, metrics=metrics
    )
    for task in tasks:
        if isinstance(tasks, Mapping):
            items = list(tasks[task])[:limit]
        else:
            items = load_task(task, shots=shots, limit=limit, seed=seed, part=part)
        mine = processes.shard(len(items))
        correct: dict[str, dict[str, list[bool]]] = {}
        logprobs: dict[str, list[list[float]]] = {}
        for name, config in configs.items():
            saved = Checkpoint(checkpoint, task, name, config, items) if checkpoint else None
            if saved is not None and saved.load():
                logprobs[name], report.seconds[f"{task}/{name}"] = saved.logprobs, saved.seconds
            else:
                # one process: the pass itself is saved as it goes, so an interrupted one resumes batch by batch
                partial = saved is not None and processes.world == 1
                done, seconds_before = saved.load_partial(batch_size) if partial else ([], 0.0)
                progress_saver = _Progress(saved, batch_size, seconds_before, save_every) if partial else None
                started = time.perf_counter()
                with patch_context(model, config):
                    values = option_logprobs(
                        model,
                        tokenizer,
                        [items[i] for i in mine],
                        batch_size=batch_size,
                        progress=progress and processes.main,
                        desc=f"{name} · {task}",
                        done=done,
                        on_batch=progress_saver,
                    )
                logprobs[name] = [lp for _, lp in sorted(processes.gather(list(zip(mine, values, strict=True))))]
                seconds = progress_saver.seconds if progress_saver else time.perf_counter() - started
                report.seconds[f"{task}/{name}"] = seconds
                if saved is not None and processes.main:
                    saved.save(logprobs[name], seconds)
            correct[name] = {
                m: [pick(lp, it.options, m) == it.label for lp, it in zip(logprobs[name], items, strict=True)]
                for m in report.metrics
            }
        report.add(task, correct, seed=seed)
        if keep_items:
            ids, labels = [it.id for it in items], [it.label for it in items]
            report.items[task] = {"ids": ids, "labels": labels, "logprobs": logprobs}
    return report
