"""Neutral ACT (beta=1) reproduces the unpatched model; remove() restores it bit for bit."""

from __future__ import annotations

import pytest
import torch

import attnpatch

from tiny_models import left_padded_batch, tiny_model

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37], [2, 6, 10, 14, 18, 22]]  # longer than the sliding window (5)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", DECODERS)
def test_decoder_identity_and_remove(family, impl):
    model = tiny_model(family, impl)
    ids, mask = left_padded_batch(PROMPTS)
    real = mask.bool()
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base_logits = model(ids, attention_mask=mask).logits
        base_tokens = model.generate(ids, **gen)
        with attnpatch.patched(model, "act", beta=1.0, heads="all") as patch:
            assert model.config._attn_implementation == f"attnpatch_{impl}"
            logits = model(ids, attention_mask=mask).logits
            tokens = model.generate(ids, **gen)
            assert patch.method.last_sinks, "the ACT path must have run"
        assert model.config._attn_implementation == impl
        after_logits = model(ids, attention_mask=mask).logits
        after_tokens = model.generate(ids, **gen)
    assert (logits - base_logits)[real].abs().max() <= 1e-5
    assert torch.equal(tokens, base_tokens)
    assert_same_bits(after_logits, base_logits)
    assert torch.equal(after_tokens, base_tokens)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_encoder_identity_and_remove(impl):
    model = tiny_model("bert", impl)
    ids, mask = left_padded_batch(PROMPTS)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).last_hidden_state
        patch = attnpatch.apply(model, "act", beta=1.0, heads="all")
        same = model(ids, attention_mask=mask).last_hidden_state
        patch.remove()
        after = model(ids, attention_mask=mask).last_hidden_state
        with attnpatch.patched(model, "act", beta=0.2, threshold=0.05, heads="all") as patch:
            changed = model(ids, attention_mask=mask).last_hidden_state
            assert any(s.any() for s in patch.method.last_sinks.values())
    real = mask.bool()
    assert (same - base)[real].abs().max() <= 1e-5
    assert_same_bits(after, base)
    assert (changed - base)[real].abs().max() > 1e-3


def test_act_changes_outputs_with_default_beta():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(PROMPTS)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        with attnpatch.patched(model, "act", heads="all", threshold=0.05):
            act = model(ids, attention_mask=mask).logits
    assert (act - base)[mask.bool()].abs().max() > 1e-3


def test_two_models_stay_independent():
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    ids, mask = left_padded_batch(PROMPTS)
    with torch.no_grad():
        base = a(ids, attention_mask=mask).logits
        pa = attnpatch.apply(a, "act", beta=0.1, threshold=0.05, heads="all")
        pb = attnpatch.apply(b, "act", beta=1.0, heads="all")
        out_a = a(ids, attention_mask=mask).logits
        out_b = b(ids, attention_mask=mask).logits
        pb.remove()
        out_a_again = a(ids, attention_mask=mask).logits
        pa.remove()
    real = mask.bool()
    assert (out_b - base)[real].abs().max() <= 1e-5
    assert (out_a - base)[real].abs().max() > 1e-3
    assert torch.equal(out_a, out_a_again)


def test_subset_of_heads_leaves_other_heads_alone():
    """Unselected heads of a selected layer come from the base function unchanged."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(PROMPTS)
    captured = {}

    def grab(name):
        def hook(_m, args):
            captured[name] = args[0].detach().clone()

        return hook

    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(grab("x"))
    with torch.no_grad():
        model(ids, attention_mask=mask)
        base = captured["x"].view(2, ids.shape[1], 4, 16)
        with attnpatch.patched(model, "act", beta=0.0, threshold=0.02, heads={0: [1, 3]}) as patch:
            model(ids, attention_mask=mask)
            sinks = patch.method.last_sinks[0]
    handle.remove()
    act = captured["x"].view(2, ids.shape[1], 4, 16)
    real = mask.bool()
    assert torch.equal(act[:, :, [0, 2]][real], base[:, :, [0, 2]][real])
    assert sinks.shape[1] == 2 and sinks.any()
    assert (act[:, :, [1, 3]] - base[:, :, [1, 3]])[real].abs().max() > 1e-4
