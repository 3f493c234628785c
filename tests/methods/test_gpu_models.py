"""GPU checks of a ~0.85B-parameter random Llama with planted sinks (`tiny_models.planted_llama`) patched end to end
with ACT: identity at beta = 1 and bit-exact remove(), and the Triton and PyTorch paths agreeing (bf16, fp32). Skipped
without CUDA. (The kernels' own GPU checks are in tests/kernels/test_gpu.py.)

Tolerances come from the model itself: twice the drift between two correct attention implementations at the model's
dtype (eager vs sdpa) through the whole model, plus 0.01.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.kernels.backend import ENV_VAR

from precision import fp32_matmuls
from tiny_models import SINK, SINK_2, left_padded_batch, planted_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
BETA = 0.4


def model_prompts(device=DEVICE):
    """Two left-padded prompts (48 and 31 tokens), each with SINK first and SINK_2 in the middle; and the middle
    positions."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (48, 31):
        tokens = torch.randint(10, 32000, (n,), generator=g).tolist()
        tokens[0], tokens[n // 2] = SINK, SINK_2
        rows.append(tokens)
    ids, mask = left_padded_batch(rows)
    width = ids.shape[1]
    middle = [width - n + n // 2 for n in (48, 31)]
    return ids.to(device), mask.to(device), middle


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits.float()


def eager_sdpa_gap(model, ids, mask):
    """(sdpa logits, max |eager - sdpa| over real positions): how far two correct attention implementations at the
    model's dtype drift apart through the whole model; the scale of a tolerance for a third one."""
    model.set_attn_implementation("eager")
    try:
        eager = logits_of(model, ids, mask)
    finally:
        model.set_attn_implementation("sdpa")
    base = logits_of(model, ids, mask)
    return base, (eager - base)[mask.bool()].abs().max().item()


def assert_same_generation(base, other, prompt_len, tol, eos):
    """Per sequence, up to its first differing token (if any): every step's logits agree within `tol` (the decode
    path: KV cache, running statistic), and the step where the tokens part is a near tie of the unpatched model
    (top-2 margin <= 2 tol, so a difference of tol in each logit may break it)."""
    steps = min(len(base.logits), len(other.logits))
    for row in range(base.sequences.shape[0]):
        for t in range(steps):
            diff = (other.logits[t][row].float() - base.logits[t][row].float()).abs().max().item()
            assert diff <= tol, f"row {row}, step {t}: logits differ by {diff:.3g} > {tol:.3g}"
            a, b = base.sequences[row, prompt_len + t].item(), other.sequences[row, prompt_len + t].item()
            if a != b:
                logits = base.logits[t][row].float().clone()
                logits[eos] = float("-inf")  # min_new_tokens keeps eos out of greedy's choice
                top = logits.topk(2).values
                margin = (top[0] - top[1]).item()
                assert margin <= 2 * tol, f"row {row}, step {t}: token {b} instead of {a}, top-2 margin {margin:.3g}"
                break


@pytest.fixture(scope="module")
def llama_bf16():
    model = planted_llama(torch.bfloat16, device=DEVICE)
    yield model
    del model
    torch.cuda.empty_cache()


def check_model_identity(mp, model, *, max_new_tokens=16, device=DEVICE):
    """ACT with beta = 1 on every head (Triton path) gives the unpatched logits within twice the eager-vs-sdpa drift
    + 0.01, in the prompt pass and at every greedy decoding step, the same greedy tokens up to near ties, and remove()
    restores the unpatched logits bit for bit."""
    ids, mask, _ = model_prompts(device)
    base, gap = eager_sdpa_gap(model, ids, mask)
    tol = 2 * gap + 1e-2
    gen = dict(
        attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    with torch.no_grad():
        base_gen = model.generate(ids, **gen)
        mp.setenv(ENV_VAR, "triton")
        patch = attnpatch.apply(model, "act", beta=1.0, heads="all")
        try:
            logits = logits_of(model, ids, mask)
            sinks_found = any(bool(s.any()) for s in patch.method.last_sinks.values())
            patched_gen = model.generate(ids, **gen)
        finally:
            assert attnpatch.remove(model)
        mp.delenv(ENV_VAR)
        after = logits_of(model, ids, mask)
    assert sinks_found, "the planted sinks must be found (with beta = 1 they change nothing)"
    diff = (logits - base)[mask.bool()].abs().max().item()
    assert diff <= tol, f"beta=1 logits differ by {diff:.3g} > {tol:.3g} (eager vs sdpa: {gap:.3g})"
    assert_same_generation(base_gen, patched_gen, ids.shape[1], tol, model.config.eos_token_id)
    assert torch.equal(after, base), "remove() must restore the unpatched model bit for bit"


def check_model_backends_agree(mp, model, *, rel_tol=None, device=DEVICE):
    """ACT (beta 0.4, every head) through the Triton kernels and through the PyTorch path: the same sinks in every
    layer (exactly the middle sink token of each prompt; the first one is kept), and logits within `rel_tol` times the
    largest logit when given (fp32), else (bf16) within 3 x the eager-vs-sdpa drift + 0.01: the field's factor 2 on
    the drift of two correct bf16 attention implementations, times 1.6 for ACT's correction, which multiplies the
    non-sink part of a row's output, rounding included, by c = (1 - beta S) / (1 - S) = 1.6 at this model's S ~ 0.5."""
    ids, mask, middle = model_prompts(device)
    base, gap = eager_sdpa_gap(model, ids, mask)
    tol = 3 * gap + 1e-2 if rel_tol is None else rel_tol * base.abs().max().item()
    runs = {}
    with attnpatch.patched(model, "act", beta=BETA, heads="all") as patch:
        for path in ("torch", "triton"):
            mp.setenv(ENV_VAR, path)
            with fp32_matmuls():
                logits = logits_of(model, ids, mask)
            runs[path] = logits, {layer: s.clone() for layer, s in patch.method.last_sinks.items()}
    mp.delenv(ENV_VAR)
    (ref, ref_sinks), (fast, fast_sinks) = runs["torch"], runs["triton"]
    assert set(ref_sinks) == set(fast_sinks) == set(range(model.config.num_hidden_layers))
    for layer, sinks in ref_sinks.items():
        expected = torch.zeros_like(sinks)
        for row, pos in enumerate(middle):
            expected[row, :, pos] = True
        assert torch.equal(sinks, expected), f"layer {layer}: the reference must find the planted sinks"
        assert torch.equal(fast_sinks[layer], sinks), f"layer {layer}: Triton and PyTorch sinks differ"
    real = mask.bool()
    diff = (fast - ref)[real].abs().max().item()
    changed = (ref - base)[real].abs().max().item()
    assert diff <= tol, f"Triton vs PyTorch ACT logits differ by {diff:.3g} > {tol:.3g} (eager vs sdpa: {gap:.3g})"
    assert changed > 2 * tol, f"ACT must change the logits by more than the tolerance ({changed:.3g})"


def test_model_identity_and_remove(monkeypatch, llama_bf16):
    check_model_identity(monkeypatch, llama_bf16)


def test_model_act_backends_agree_bf16(monkeypatch, llama_bf16):
    check_model_backends_agree(monkeypatch, llama_bf16)


def test_model_act_backends_agree_fp32(monkeypatch):
    model = planted_llama(torch.float32, device=DEVICE)
    try:
        check_model_backends_agree(monkeypatch, model, rel_tol=1e-3)
    finally:
        del model
        torch.cuda.empty_cache()
