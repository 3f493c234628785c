"""attnpatch.analysis: the sink statistic of one forward pass, its table / summary / JSON forms, and the heatmap."""

from __future__ import annotations

import json
import sys
from dataclasses import astuple

import pytest
import torch

import attnpatch
from attnpatch.analysis import SinkAnalysis, classify_tokens, find_sinks, sink_heatmap, sinks

from tiny_models import SINK_TOKEN, SINK_TOKEN_2, VOCAB, left_padded_batch, planted_sink_model

BOS = 1


@pytest.fixture(scope="module")
def model():
    return planted_sink_model()


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny vocabulary: the planted sinks decode as "." (7) and "\\n" (8)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    names = {0: "<pad>", BOS: "<bos>", 2: "<unk>", SINK_TOKEN: ".", SINK_TOKEN_2: "\n", 9: "?"}
    vocab = {names.get(i, f"w{i}"): i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        bos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def planted(ids: torch.Tensor) -> torch.Tensor:
    return (ids == SINK_TOKEN) | (ids == SINK_TOKEN_2)


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the first real token of each row."""
    return torch.zeros_like(mask, dtype=torch.bool).scatter(-1, mask.argmax(-1, keepdim=True), True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_planted_sinks_in_every_head_and_pads_never(family, sink_prompts):
    ids, mask = sink_prompts
    a = sinks(planted_sink_model(family=family), {"input_ids": ids, "attention_mask": mask})
    assert a.layers == [0, 1, 2, 3] and a.num_heads == [4, 4, 4, 4]
    assert a.column_mean.shape == a.count.shape == (4, 4, 2, ids.shape[1])
    # every (layer, head, sequence) has exactly the planted tokens as sinks; the first is the first real token
    assert torch.equal(a.sinks, planted(ids).expand_as(a.sinks))
    assert torch.equal(a.first, first_real(mask).expand_as(a.first))
    assert torch.equal(a.hidden, (planted(ids) & ~first_real(mask)).expand_as(a.hidden))
    pads = mask == 0
    assert pads.any()
    assert not a.sinks[:, :, pads].any()
    assert (a.count[:, :, pads] == 0).all()
    assert all(a.token_classes[b][t] == "pad" for b, t in pads.nonzero().tolist())
    starts = mask.argmax(-1).tolist()
    assert [a.token_classes[b][starts[b]] for b in range(2)] == ["bos", "bos"]
    rows = a.table()
    assert len(rows) == int(a.sinks.sum())
    assert {r["token_id"] for r in rows} == {SINK_TOKEN, SINK_TOKEN_2}
    assert all(r["first"] == (r["position"] == starts[r["sequence"]]) != r["hidden"] for r in rows)
    summary = a.summary()
    assert summary["first_by_class"]["bos"] == summary["first_sinks"] == 2 * 16
    assert summary["heads_with_hidden_sinks"] == {0: 4, 1: 4, 2: 4, 3: 4}
    assert sum(summary["hidden_by_class"].values()) == summary["hidden_sinks"]


def test_patch_is_neutral_and_removed(model, sink_prompts):
    ids, mask = sink_prompts
    with torch.inference_mode():
        base = model(input_ids=ids, attention_mask=mask).logits
    seen = []
    handle = model.register_forward_hook(lambda _m, _args, out: seen.append(out.logits.clone()))
    try:
        sinks(model, {"input_ids": ids, "attention_mask": mask})
    finally:
        handle.remove()
    assert attnpatch.get_patch(model) is None
    real = mask.bool()
    torch.testing.assert_close(seen[0][real], base[real], rtol=0, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


def test_input_forms_layers_and_find_sinks(model, sink_prompts):
    ids, mask = sink_prompts
    full = sinks(model, {"input_ids": ids, "attention_mask": mask})
    single = sinks(model, ids[0])  # row 0 is the longest: no padding
    assert single.column_mean.shape == (4, 4, 1, ids.shape[1])
    assert torch.equal(single.sinks[:, :, 0], full.sinks[:, :, 0])
    torch.testing.assert_close(single.column_mean[:, :, 0], full.column_mean[:, :, 0], rtol=0, atol=1e-5)
    some = sinks(model, {"input_ids": ids, "attention_mask": mask}, layers=[-1, 1])
    assert some.layers == [1, 3]
    assert torch.equal(some.sinks, full.sinks[[1, 3]])
    torch.testing.assert_close(some.column_mean, full.column_mean[[1, 3]], rtol=0, atol=1e-5)
    assert [r["layer"] for r in some.table()] == [r["layer"] for r in full.table() if r["layer"] in (1, 3)]
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        sinks(model, ids, layers=[9])
    with pytest.raises(ValueError, match="input_ids"):
        sinks(model, {"attention_mask": mask})
    reports = find_sinks(model, ids, mask)
    expected = [
        (r["layer"], r["head"], r["sequence"], r["position"], r["column_mean"], r["count"], r["first"])
        for r in sorted(full.table(), key=lambda r: (r["sequence"], r["layer"], r["head"], r["position"]))
    ]
    assert [astuple(r) for r in reports] == expected


def test_min_visible_rows_drops_the_last_keys(model, sink_prompts):
    ids, mask = sink_prompts
    a = sinks(model, {"input_ids": ids, "attention_mask": mask}, min_visible_rows=4)
    assert a.tail_rows == 4
    assert not a.sinks[:, :, 1, -3:].any()  # the last sink of row 1 is seen by one row only
    assert a.sinks[:, :, 1, -5].all()  # the one before it by four
    assert not a.sinks[(a.count < 4) & a.attention_mask.bool()].any()


def test_to_dict_round_trips_through_json(model, sink_prompts, tokenizer):
    ids, mask = sink_prompts
    a = sinks(model, {"input_ids": ids, "attention_mask": mask}, tokenizer=tokenizer)
    data = a.to_dict()
    loaded = json.loads(json.dumps(data))
    assert loaded == data
    b = SinkAnalysis.from_dict(loaded)
    assert b.to_dict() == data
    assert torch.equal(b.sinks, a.sinks) and torch.equal(b.column_mean, a.column_mean)
    assert data["summary"]["heads_with_hidden_sinks"] == {"0": 4, "1": 4, "2": 4, "3": 4}
    light = a.to_dict(include_stats=False)
    assert "column_mean" not in light and json.loads(json.dumps(light)) == light
    with pytest.raises(ValueError, match="include_stats=True"):
        SinkAnalysis.from_dict(light)


def test_token_classes_through_a_tokenizer(model, tokenizer):
    w = list(range(11, 30))
    row_a = [BOS, w[0], SINK_TOKEN, w[1], w[2], SINK_TOKEN_2, w[3], w[4], w[5], w[6], w[7], w[8], SINK_TOKEN_2]
    row_b = [SINK_TOKEN, w[9], SINK_TOKEN_2, w[10], w[11], w[12], w[13], w[14]]
    ids, mask = left_padded_batch([row_a, row_b])
    a = sinks(model, {"input_ids": ids, "attention_mask": mask}, tokenizer=tokenizer)
    pads = 5 * ["pad"]
    expected = ["bos", "other", "punctuation", "other", "other", "newline", "other", "other", "other"]
    assert a.token_classes[0] == expected + 4 * ["last-tokens"]  # the last four are seen by 4, 3, 2, 1 rows
    assert a.token_classes[1] == pads + ["bos", "other", "newline", "other"] + 4 * ["last-tokens"]
    assert a.tokens[0][:4] == ["<bos>", "w11", ".", "w12"] and a.tokens[1][7] == "\n"
    # <bos> is no planted sink, but the first rows of a causal model see nothing else: it is row a's first sink
    summary = a.summary()
    assert summary["first_by_class"] == {"bos": 32, "last-tokens": 0, "newline": 0, "punctuation": 0, "other": 0}
    assert summary["hidden_keys_by_class"] == {"bos": 0, "last-tokens": 1, "newline": 2, "punctuation": 1, "other": 0}
    assert summary["hidden_by_class"]["punctuation"] == 16  # the "." at position 2, in every (layer, head)
    assert summary["hidden_by_class"]["newline"] == 2 * 16
    newline_rows = [r for r in a.table(hidden_only=True) if r["token_class"] == "newline"]
    assert {(r["sequence"], r["position"], r["token"]) for r in newline_rows} == {(0, 5, "\n"), (1, 7, "\n")}
    for tail, classes in ((1, 3 * ["other"] + ["last-tokens"]), (0, 3 * ["other"] + ["newline"])):
        assert sinks(model, ids, tokenizer=tokenizer, tail_rows=tail).token_classes[0][9:] == classes


def test_text_class_rule():
    texts = ["<bos>", "Hello", ",", " ", "\n\n", ".\n", "", "12", " (", "<eos>"]
    ids = torch.tensor([[BOS] + list(range(20, 29))])
    classes = classify_tokens(ids, torch.ones_like(ids), torch.full_like(ids, 99), tokens=[texts], bos_token_id=28)
    expected = ["bos", "other", "punctuation", "punctuation", "newline", "newline", "other", "other", "punctuation"]
    assert classes[0] == expected + ["bos"]  # the last id is the bos id
    assert classify_tokens(ids, torch.ones_like(ids), torch.full_like(ids, 99))[0] == ["bos"] + 9 * ["other"]


def test_layers_with_different_head_counts():
    ones = torch.ones(1, 4, dtype=torch.long)
    a = SinkAnalysis(
        layers=[0, 1],
        num_heads=[2, 1],
        input_ids=ones,
        attention_mask=ones,
        column_mean=torch.full((2, 2, 1, 4), 0.5),
        count=torch.full((2, 2, 1, 4), 9),
        threshold=0.1,
        min_visible_rows=1,
        tail_rows=4,
        token_classes=[["bos", "other", "other", "other"]],
    )
    assert a.sinks[0].all() and a.sinks[1, 0].all() and not a.sinks[1, 1].any()
    assert a.summary()["heads_with_hidden_sinks"] == {0: 2, 1: 1}
    assert a.layer_map("mean").shape == (2, 1, 4)


def test_heatmap_png(model, sink_prompts, tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    ids, mask = sink_prompts
    a = sinks(model, {"input_ids": ids, "attention_mask": mask}, tokenizer=tokenizer)
    path = tmp_path / "sinks.png"
    fig = sink_heatmap(a, sequence=1, path=path, dpi=80)
    width, height = fig.get_size_inches() * 80
    assert imread(path).shape == (round(height), round(width), 4)
    ax = fig.axes[0]
    real = mask[1].bool()
    assert ax.images[0].get_array().shape == (4, int(real.sum()))  # layers x real positions of sequence 1
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        tokenizer.decode([i]).replace("\n", "\\n") for i in ids[1][real].tolist()
    ]
    hidden_marks = ax.collections[0].get_offsets()
    assert len(hidden_marks) == int(a.hidden.any(dim=1)[:, 1].sum())
    own = Figure()
    assert sink_heatmap(a, sequence=0, ax=own.add_subplot(), reduce="mean") is own
    with pytest.raises(ValueError, match="reduce must be"):
        sink_heatmap(a, reduce="median")
    with pytest.raises(ValueError, match="sequence 2 is out of range"):
        sink_heatmap(a, sequence=2)


def test_heatmap_without_matplotlib_says_how_to_install(monkeypatch):
    ones = torch.ones(1, 2, dtype=torch.long)
    a = SinkAnalysis(
        [0], [1], ones, ones, torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0.1, 1, 4, [["bos", "other"]]
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'attnpatch\[viz\]'"):
        sink_heatmap(a)
