"""Public API contract and the errors a user gets for bad input."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import UnsupportedModelError

from tiny_models import left_padded_batch, tiny_model


def test_available_methods():
    assert "act" in attnpatch.available_methods()


def test_unknown_method():
    with pytest.raises(ValueError, match="available methods"):
        attnpatch.apply(tiny_model("llama"), "nope")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(beta=1.5), r"beta must be in \[0.0, 1.0\], got 1.5"),
        (dict(beta=-0.1), "beta must be in"),
        (dict(beta="0.4"), "beta must be a number"),
        (dict(threshold=2), "threshold must be in"),
        (dict(keep_first_sink="yes"), "keep_first_sink must be True or False"),
        (dict(min_visible_rows=0), "min_visible_rows must be in"),
        (dict(min_visible_rows=2.5), "min_visible_rows must be an integer"),
        (dict(heads=[1, 2]), "heads must be None, 'all' or a dict"),
        (dict(heads={9: [0]}), r"layer 9 is out of range; the model has layers 0..3"),
        (dict(heads={1: [4]}), r"head 4 is out of range; layer 1 has heads 0..3"),
        (dict(heads={1: "some"}), "must be a list of head indices"),
        (dict(heads={}), r"heads=\{\} selects no head, so nothing would be patched"),
        (dict(heads={2: []}), r"heads\[2\] is empty, so layer 2 would not be patched"),
        (dict(heads={"x": "all"}), "heads: layer 'x' must be an integer, not str"),
        (dict(heads={2.0: "all"}), "heads: layer 2.0 must be an integer, not float"),
        (dict(betta=0.4), r"unknown option\(s\) \['betta'\]"),
        (dict(profile=123), "profile must be a Profile or the path of a directory written by Profile.save, got int"),
    ],
)
def test_bad_options(options, match):
    model = tiny_model("llama")
    with pytest.raises((TypeError, ValueError), match=match):
        attnpatch.apply(model, "act", **options)
    assert attnpatch.get_patch(model) is None
    assert model.config._attn_implementation == "sdpa"


def test_layer_keys_read_from_json_are_layer_indices():
    model = tiny_model("llama")
    with attnpatch.patched(model, "act", heads={"2": "all", "1": [0, 3]}) as patch:
        assert patch.method.heads == {1: [0, 3], 2: [0, 1, 2, 3]}


def test_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="Linear.*Supported: transformers PreTrainedModel"):
        attnpatch.apply(torch.nn.Linear(2, 2), "act")
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match=r"set_attn_implementation\('sdpa'\)"):
        attnpatch.apply(model, "act")


def test_apply_twice_raises_and_remove_is_idempotent():
    model = tiny_model("llama")
    patch = attnpatch.apply(model, "act", heads="all")
    with pytest.raises(RuntimeError, match="already patched"):
        attnpatch.apply(model, "act")
    assert attnpatch.get_patch(model) is patch
    assert attnpatch.remove(model) is True
    patch.remove()
    assert attnpatch.remove(model) is False
    attnpatch.apply(model, "act", heads="all").remove()


def test_default_heads_are_layers_2_to_L_minus_2(caplog):
    model = tiny_model("llama")  # 4 layers -> layer 2 only
    with caplog.at_level("WARNING", logger="attnpatch"), attnpatch.patched(model, "act") as patch:
        assert patch.selected_layers == {2}
        assert patch.method.heads == {2: [0, 1, 2, 3]}
    assert "calibration profile" in caplog.text


def test_default_heads_on_a_shallow_model_says_nothing_is_selected(caplog):
    model = tiny_model("llama")
    model.model.layers = model.model.layers[:3]
    with caplog.at_level("WARNING", logger="attnpatch"), attnpatch.patched(model, "act") as patch:
        assert patch.selected_layers == frozenset()
    assert "nothing is calibrated" in caplog.text


def test_patched_restores_on_error():
    model = tiny_model("llama")
    with pytest.raises(KeyError), attnpatch.patched(model, "act", heads="all"):
        raise KeyError("boom")
    assert attnpatch.get_patch(model) is None and model.config._attn_implementation == "sdpa"


def test_state_stays_out_of_state_dict():
    model = tiny_model("llama")
    keys = set(model.state_dict())
    ids, mask = left_padded_batch([[1, 2, 3, 4]])
    with torch.no_grad(), attnpatch.patched(model, "act", heads="all"):
        model(ids, attention_mask=mask)
        assert set(model.state_dict()) == keys


def test_dropout_in_training_mode_is_refused():
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    ids, mask = left_padded_batch([[1, 2, 3, 4]])
    with attnpatch.patched(model, "act", heads="all"), pytest.raises(RuntimeError, match="model.eval"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_output_attentions_returns_one_map_per_layer(base):
    """Every base returns one map per layer with some layers patched: the patched layer's calibrated map, the others
    as eager attention computes them (the sdpa base computes none), so attentions[i] is layer i."""
    eager = tiny_model("llama", "eager")
    model = tiny_model("llama", base)
    ids, mask = left_padded_batch([[1, 5, 9, 13, 17, 21], [2, 6, 10, 14]])
    rows = mask.bool()[:, None, :, None]
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask, output_attentions=True).attentions
        with attnpatch.patched(model, "act", heads={1: "all"}, threshold=0.05, beta=0.0):
            maps = model(ids, attention_mask=mask, output_attentions=True).attentions
        with attnpatch.patched(model, "head_mask", gates={2: [1.0, 0.0, 1.0, 1.0]}):
            gated = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(maps) == len(gated) == len(reference) == model.config.num_hidden_layers
    assert all(m.dtype == torch.float32 and m.shape == r.shape for m, r in zip(maps, reference, strict=True))
    assert ((maps[0] - reference[0]) * rows).abs().max() <= 1e-6  # before the patched layer: the same
    sums = maps[1].sum(-1)  # [B, H, L]
    assert torch.allclose(sums[mask.bool()[:, None].expand_as(sums)], torch.ones(()), atol=1e-5)
    assert ((maps[1] - reference[1]) * rows).abs().max() > 1e-2  # the calibrated layer's own map
    for layer in range(3):  # gates on layer 2's head outputs leave the probabilities up to layer 2 as they are
        assert ((gated[layer] - reference[layer]) * rows).abs().max() <= 1e-6


def test_patch_repr_says_what_is_patched():
    model = tiny_model("llama")
    with attnpatch.patched(model, "act", heads={1: [0, 2], 2: "all"}, beta=0.3) as patch:
        text = repr(patch)
    assert text.startswith("Patch(LlamaForCausalLM <- act(beta=0.3, threshold=0.1")
    assert "6 heads in 2 layers: {1: [0, 2], 2: all}; active" in text
    assert repr(patch).endswith("; removed)")
    with attnpatch.patched(model, "act", heads="all") as patch:
        assert "16 heads in 4 layers: every head of layers 0..3" in repr(patch)
