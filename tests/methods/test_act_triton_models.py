"""ACT through attnpatch.apply on the Triton kernels (on the GPU, else the interpreter on CPU) agrees with the PyTorch
path, in prefill and in cached generation, for models with GQA, left padding and sliding-window layers. Both paths run
on TRITON_DEVICE, so that only the attention differs between them."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.kernels import backend

from devices import TRITON_DEVICE, on_triton_device
from tiny_models import SINK_TOKEN, SINK_TOKEN_2, planted_sink_model, tiny_model

ACT = dict(beta=0.4, threshold=0.1, heads="all")

pytestmark = pytest.mark.skipif(
    backend.triton_version() is None or not (torch.cuda.is_available() or backend.interpreting()),
    reason="needs triton on CUDA or TRITON_INTERPRET=1",
)


def generate_with(model, ids, mask, path: str, monkeypatch, **options):
    monkeypatch.setenv(backend.ENV_VAR, path)
    gen = dict(
        attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
        suppress_tokens=[SINK_TOKEN, SINK_TOKEN_2], return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    with torch.no_grad(), attnpatch.patched(model, "act", **options) as patch:
        out = model.generate(ids, **gen)
        sinks = {layer: s.clone() for layer, s in patch.method.last_sinks.items()}
    return out, sinks


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_matches_pytorch_path(family, sink_prompts, monkeypatch):
    """Prefill and four cached steps: identical tokens and sink sets, logits within fp32 rounding."""
    model = planted_sink_model("sdpa", family).to(TRITON_DEVICE)
    ids, mask = on_triton_device(*sink_prompts)
    fast, fast_sinks = generate_with(model, ids, mask, "triton", monkeypatch, **ACT)
    slow, slow_sinks = generate_with(model, ids, mask, "torch", monkeypatch, **ACT)
    assert torch.equal(fast.sequences, slow.sequences)
    assert all(torch.equal(fast_sinks[layer], slow_sinks[layer]) for layer in slow_sinks)
    assert any(s.any() for s in slow_sinks.values()), "sinks must be found, or the comparison proves nothing"
    for a, b in zip(fast.logits, slow.logits, strict=True):
        assert (a - b).abs().max() <= 1e-4


def test_neutral_beta_matches_unpatched_gemma3(monkeypatch):
    """beta=1 on the Triton path reproduces the unpatched logits (Gemma 3: sliding and global layers, GQA)."""
    model = tiny_model("gemma3", "sdpa").to(TRITON_DEVICE)
    ids = torch.randint(3, 32, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids, mask = on_triton_device(ids, mask)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        monkeypatch.setenv(backend.ENV_VAR, "triton")
        with attnpatch.patched(model, "act", beta=1.0, heads="all"):
            patched = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (patched - plain)[valid].abs().max() <= 1e-5
