"""ACT on the real Gemma-3 270M from the offline zoo (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.analysis import find_sinks

pytestmark = pytest.mark.slow

PROMPTS = [
    "Question: Which gas do green plants take in from the air to make their food?\nAnswer:",
    "The capital of France is",
]


@pytest.fixture(scope="module")
def gemma():
    from attnpatch.models import load

    model, tok = load("gemma-3-270m", dtype=torch.float32)
    tok.padding_side = "left"
    return model, tok


def test_neutral_act_is_identity_on_real_model(gemma):
    model, tok = gemma
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    gen = dict(**enc, max_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        base = model(**enc).logits
        base_tokens = model.generate(**gen)
        with attnpatch.patched(model, "act", beta=1.0, heads="all"):
            same = model(**enc).logits
            tokens = model.generate(**gen)
        after = model(**enc).logits
    real = enc.attention_mask.bool()
    assert (same - base)[real].abs().max() <= 1e-4  # logits are ~30 in size; 18 layers of fp32 reordering
    assert torch.equal(tokens, base_tokens)
    torch.testing.assert_close(after, base, rtol=0, atol=0, equal_nan=True)


def test_act_changes_a_layer_only_in_heads_with_sinks(gemma):
    """With one layer selected, the heads of that layer without hidden sinks keep their output exactly; heads with
    hidden sinks change; and the model's logits change."""
    model, tok = gemma
    enc = tok(PROMPTS[:1], return_tensors="pt")
    reports = find_sinks(model, enc.input_ids, enc.attention_mask)
    hidden = {(r.layer, r.head) for r in reports if not r.first}
    layers = sorted({layer for layer, _ in hidden})
    assert layers, "Gemma-3 270M has hidden sinks on this prompt"
    heads = model.config.num_attention_heads
    # prefer a layer where some heads have hidden sinks and others do not
    mixed = [layer for layer in layers if 0 < sum((layer, h) in hidden for h in range(heads)) < heads]
    layer = (mixed or layers)[0]
    captured = []
    o_proj = model.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
    try:
        with torch.inference_mode():
            base_logits = model(**enc).logits
            with attnpatch.patched(model, "act", heads={layer: "all"}) as patch:
                act_logits = model(**enc).logits
                sinks = patch.method.last_sinks[layer][0]  # [H, L]
    finally:
        handle.remove()
    base, act = (x.view(x.shape[1], heads, -1) for x in captured)
    for h in range(heads):
        scale = base[:, h].abs().max().item()
        diff = (act[:, h] - base[:, h]).abs().max().item() / scale  # relative to the head's output size
        if sinks[h].any():
            assert diff > 1e-3, (h, diff)
        else:
            assert diff <= 1e-5, (h, diff)  # fp32 summation order only
    assert sinks.any(-1).tolist() == [(layer, h) in hidden for h in range(heads)]
    assert (act_logits - base_logits).abs().max() > 1e-3


def test_first_sink_is_bos(gemma):
    model, tok = gemma
    enc = tok(PROMPTS[:1], return_tensors="pt")
    reports = find_sinks(model, enc.input_ids, enc.attention_mask)
    firsts = [r for r in reports if r.first]
    assert sum(r.position == 0 for r in firsts) / len(firsts) > 0.9
