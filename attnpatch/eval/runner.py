"""A/B evaluation: several configurations (unpatched, a method with options, a calibrated profile) scored on the same
items of several tasks, with bootstrap intervals and paired tests against the first configuration.

Under `accelerate launch` each process scores a shard of every task's items and the per-item results are gathered,
so the report is the same as a single-process run's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..distributed import Processes
from .configs import Config, describe, patch_context
from .scoring import Normalize, score_items
from .stats import bootstrap_ci, paired_comparison
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
    """Per task and configuration: accuracy, its 95% bootstrap interval, and the paired comparison with the first
    configuration (diff, its interval, McNemar p)."""

    model: str
    configs: dict[str, Any]
    tasks: list[str]
    shots: int
    part: str
    limit: int | None
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return next(iter(self.configs))

    def average(self, config: str) -> float:
        """Unweighted mean accuracy over the tasks."""
        return sum(self.results[t][config]["accuracy"] for t in self.tasks) / len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["average"] = {name: self.average(name) for name in self.configs}
        return data

    def to_markdown(self) -> str:
        names = list(self.configs)
        head = "| task | n | " + " | ".join(names) + " |"
        lines = [head, "|" + "---|" * (len(names) + 2)]
        for task in self.tasks:
            cells = []
            for name in names:
                r = self.results[task][name]
                cell = f"{r['accuracy']:.3f}"
                if name != self.reference:
                    p = r["paired"]
                    lo, hi = p["diff_ci"]
                    cell += f" ({100 * p['diff']:+.1f}, CI {100 * lo:+.1f}..{100 * hi:+.1f}, p={p['p_mcnemar']:.2g})"
                cells.append(cell)
            lines.append(f"| {task} | {self.results[task][names[0]]['n']} | " + " | ".join(cells) + " |")
        lines.append("| average | | " + " | ".join(f"{self.average(n):.3f}" for n in names) + " |")
        return "\n".join(lines)


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
    normalize: Normalize = "chars",
    model_name: str = "",
    progress: bool = True,
) -> EvalReport:
    """Score every configuration on the same items of every task (the `part` of each, see `load_task`).

    configs: {name: None (unpatched) | {"method": "act", **options} | Profile}; the first is the reference of the
    paired comparisons (default: just the unpatched model). tasks: names, or {name: items} for your own items.
    """
    configs = dict(configs or {"unpatched": None})
    processes = Processes()
    report = EvalReport(
        model=model_name or type(model).__name__,
        configs={name: describe(c) for name, c in configs.items()},
        tasks=list(tasks),
        shots=shots,
        part=part,
        limit=limit,
    )
    for task in tasks:
        if isinstance(tasks, Mapping):
            items = list(tasks[task])[:limit]
        else:
            items = load_task(task, shots=shots, limit=limit, seed=seed, part=part)
        mine = processes.shard(len(items))
        correct: dict[str, list[bool]] = {}
        for name, config in configs.items():
            started = time.perf_counter()
            with patch_context(model, config):
                preds = score_items(
                    model,
                    tokenizer,
                    [items[i] for i in mine],
                    batch_size=batch_size,
                    normalize=normalize,
                    progress=progress and processes.main,
                    desc=f"{name} · {task}",
                )
            local = [(i, p == items[i].label) for i, p in zip(mine, preds, strict=True)]
            correct[name] = [c for _, c in sorted(processes.gather(local))]
            report.seconds[f"{task}/{name}"] = time.perf_counter() - started
        reference = correct[report.reference]
        report.results[task] = {}
        for name, values in correct.items():
            row: dict[str, Any] = {
                "n": len(values),
                "accuracy": sum(values) / len(values),
                "ci": bootstrap_ci(values, seed=seed),
            }
            if name != report.reference:
                row["paired"] = paired_comparison(reference, values, seed=seed)
            report.results[task][name] = row
    return report
