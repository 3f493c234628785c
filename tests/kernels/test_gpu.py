"""GPU checks of the Triton kernels (attention, ACT) at real sizes against our PyTorch path in fp32. Skipped without
CUDA. (The whole-model GPU checks are in tests/methods/test_gpu_models.py.)

Tolerance rule of the field (FlashAttention's tests): max |triton_bf16 - ref_fp32| <= 2 * max |torch_bf16 - ref_fp32|
+ 1e-5, where ref_fp32 is our PyTorch path (ATTNPATCH_BACKEND=torch) on the same inputs upcast to fp32, and torch_bf16
is the same math done in PyTorch at bf16 the way transformers' eager attention does it (bf16 logits, fp32 softmax,
bf16 probabilities times V; ACT's per-row correction in fp32 with the reference's sinks). Errors are taken over the
query rows that see a key; rows that see none (left padding) must be exactly 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnpatch.kernels.act import act_attention
from attnpatch.kernels.attention import attention
from attnpatch.kernels.backend import ENV_VAR
from attnpatch.kernels.masking import KeyRanges, padding_ranges

from precision import fp32_matmuls

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
HQ, HKV = 32, 8
BETA, THRESHOLD = 0.4, 0.05  # planted sinks have column means >= ~0.15, every other key < ~0.01


# ----------------------------------------------------------------------------------------------------------- inputs


def planted(b, lq, lk, d, *, starts=(0,), dtype=torch.bfloat16, seed=0, device=DEVICE):
    """q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D] with attention sinks like a trained model's (the queries are the last Lq
    positions). Coordinate 0 of q is a constant and that of k is zero except at each sequence's first real key
    (`starts[i]`) and two hidden sinks (start + n // 8 and start + n // 2, n = real keys), whose logits are raised so
    that a late query row gives the first key ~50% of its attention and each hidden sink ~15% (the other keys have
    logits ~ N(0, 1): total weight ~ 1.65 n). Returns q, k, v and the hidden sink positions [B, 2]."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, HQ, lq, d, generator=g, device=device)
    k = torch.randn(b, HKV, lk, d, generator=g, device=device)
    v = torch.randn(b, HKV, lk, d, generator=g, device=device)
    a, scale = 8.0, d**-0.5
    q[..., 0] = a
    k[..., 0] = 0.0
    hidden = []
    for i in range(b):
        start = starts[i] if i < len(starts) else 0
        n = lk - start
        rest = math.log(1.65 * n)
        k[i, :, start, 0] = (rest + math.log(2.5)) / (a * scale)
        hidden.append([start + n // 8, start + n // 2])
        for p in hidden[-1]:
            k[i, :, p, 0] = (rest + math.log(0.75)) / (a * scale)
    return q.to(dtype), k.to(dtype), v.to(dtype), torch.tensor(hidden, device=device)


def padding_mask(b, lk, pads, device=DEVICE):
    """[B, Lk] int64 2-D attention mask, row i left-padded by pads[i]."""
    am = torch.ones(b, lk, dtype=torch.long, device=device)
    for i, p in enumerate(pads):
        am[i, :p] = 0
    return am


def hf_mask(am, lq):
    """transformers-style 4-D bool mask [B, 1, Lq, Lk] (True = visible) for queries at the last Lq positions."""
    lk = am.shape[1]
    cols = torch.arange(lk, device=am.device)
    own = torch.arange(lk - lq, lk, device=am.device)
    return (cols[None, :] <= own[:, None])[None, None] & am.bool()[:, None, None, :]


def masks(am, lq, kind):
    """(mask argument for our ops, KeyRanges of the same visibility)."""
    ranges = padding_ranges(am, lq, causal=True)
    if kind == "causal":  # no mask: the causal rule (only for Lq = Lk, where top-left and bottom-right agree)
        assert lq == am.shape[1] and bool(am.bool().all())
        return None, ranges
    return (ranges if kind == "ranges" else hf_mask(am, lq)), ranges


def eager_low(q, k, v, *, scale, ranges: KeyRanges, sinks=None, beta=1.0, heads_per_block=8, rows_per_block=1024):
    """The same math in PyTorch at the input dtype, like transformers' eager attention: logits from a bf16 matmul,
    softmax in fp32, probabilities rounded to bf16 for the matmul with V; with `sinks` [B, Hq, Lk], ACT's per-row
    correction (in fp32, before the rounding). Blocked over heads and rows to bound memory."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    cols = torch.arange(lk, device=q.device)
    valid = ranges.nonempty()
    for h0 in range(0, hq, heads_per_block):
        h1 = min(hq, h0 + heads_per_block)
        kv = torch.arange(h0, h1, device=q.device) // (hq // hkv)
        kh, vh = k[:, kv], v[:, kv]
        for r0 in range(0, lq, rows_per_block):
            r1 = min(lq, r0 + rows_per_block)
            s = (q[:, h0:h1, r0:r1] @ kh.transpose(-1, -2)) * scale
            seen = (cols >= ranges.lo[:, None, r0:r1, None]) & (cols < ranges.hi[:, None, r0:r1, None])
            p = torch.softmax(s.float().masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
            if sinks is not None:
                sw = sinks[:, h0:h1, None, :].float()
                mass = (p * sw).sum(-1, keepdim=True)
                rest = (p * (1.0 - sw)).sum(-1, keepdim=True)
                live = valid[:, None, r0:r1, None] & (rest > 0)
                c = torch.where(live, 1.0 + (1.0 - beta) * mass / rest.clamp_min(1e-30), 1.0)
                w_sink = torch.where(live, beta, 1.0)
                p = p * torch.where(sw > 0, w_sink, c)  # a select: c may be huge where rest is tiny
            out[:, h0:h1, r0:r1] = p.to(q.dtype) @ vh
    return out


def max_err(x, ref, rows):
    """max |x - ref| over the query rows `rows` [B, Lq]."""
    return (x.float() - ref.float()).abs().transpose(1, 2)[rows].max().item()


def assert_field_rule(fast, low, ref, rows):
    err, low_err = max_err(fast, ref, rows), max_err(low, ref, rows)
    assert err <= 2 * low_err + 1e-5, f"triton error {err:.3g} > 2 x eager-{fast.dtype} error {low_err:.3g} + 1e-5"
    assert bool((fast.transpose(1, 2)[~rows] == 0).all()), "rows that see no key must be 0"


def up(*ts):
    return [t.float() for t in ts]


# ------------------------------------------------------------------------------------------------------- attention


def check_attention(mp, *, b, lq, lk, d, pads, kind, device=DEVICE):
    q, k, v, _ = planted(b, lq, lk, d, starts=pads, device=device)
    mask, ranges = masks(padding_mask(b, lk, pads, device), lq, kind)
    kw = dict(scale=d**-0.5, causal=True, mask=mask, return_lse=True)
    mp.setenv(ENV_VAR, "torch")
    with fp32_matmuls():
        ref, ref_lse = attention(*up(q, k, v), **kw)
    mp.setenv(ENV_VAR, "triton")  # forced: a call the kernel cannot take fails instead of falling back
    out, lse = attention(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    low = eager_low(q, k, v, scale=d**-0.5, ranges=ranges)
    rows = ranges.nonempty()
    assert_field_rule(out, low, ref, rows)
    rows_h = rows[:, None, :].expand_as(lse)
    torch.testing.assert_close(lse[rows_h], ref_lse[rows_h], atol=1e-3, rtol=0)
    assert bool(torch.isneginf(lse[~rows_h]).all()), "the LSE of rows that see no key is -inf"


@pytest.mark.parametrize(("lk", "d"), [(1024, 128), (4096, 128), (16384, 128), (1024, 256), (4096, 256)])
def test_attention_prefill(monkeypatch, lk, d):
    check_attention(monkeypatch, b=1, lq=lk, lk=lk, d=d, pads=(0,), kind="causal")


@pytest.mark.parametrize("kind", ["ranges", "hf4d"])
@pytest.mark.parametrize("d", [128, 256])
def test_attention_left_padded(monkeypatch, kind, d):
    check_attention(monkeypatch, b=2, lq=1536, lk=1536, d=d, pads=(0, 301), kind=kind)


@pytest.mark.parametrize("kind", ["ranges", "hf4d"])
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("lq", [1, 7])
def test_attention_decode_and_chunk(monkeypatch, lq, d, kind):
    check_attention(monkeypatch, b=2, lq=lq, lk=4096, d=d, pads=(0, 517), kind=kind)


# ------------------------------------------------------------------------------------------------------------- ACT


def check_act(mp, *, b, lq, lk, d, pads, kind, device=DEVICE):
    """ACT with planted sinks: Lq = Lk is a prefill; Lq < Lk continues the statistic of a prefill of the first Lk - Lq
    positions (decode for Lq = 1, chunked prefill otherwise), each backend with its own history."""
    q, k, v, hidden = planted(b, lk, lk, d, starts=pads, device=device)  # one query per position
    am = padding_mask(b, lk, pads, device)
    act = dict(scale=d**-0.5, beta=BETA, threshold=THRESHOLD, causal=True)
    mask, ranges = masks(am, lq, kind)

    def run(q, k, v):
        if lq == lk:
            return act_attention(q, k, v, mask=mask, **act)
        p = lk - lq
        first = act_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], mask=masks(am[:, :p], p, kind)[0], **act)
        return act_attention(q[:, :, p:], k, v, mask=mask, history=first.stats, **act)

    mp.setenv(ENV_VAR, "torch")
    with fp32_matmuls():
        ref = run(*up(q, k, v))
    mp.setenv(ENV_VAR, "triton")
    fast = run(q, k, v)

    planted_sinks = torch.zeros(b, HQ, lk, dtype=torch.bool, device=device)
    for i in range(b):
        planted_sinks[i, :, hidden[i]] = True  # the first real key is a sink too, and kept (keep_first_sink)
    assert torch.equal(ref.sinks, planted_sinks), "the fp32 reference must find exactly the planted hidden sinks"
    assert torch.equal(fast.sinks, ref.sinks)
    assert torch.equal(fast.stats.count, ref.stats.count)
    assert (fast.stats.mean - ref.stats.mean).abs().max().item() <= 1e-3

    qq = q[:, :, lk - lq :]
    rows = ranges.nonempty()
    low = eager_low(qq, k, v, scale=d**-0.5, ranges=ranges, sinks=ref.sinks, beta=BETA)
    assert fast.out.dtype == q.dtype
    assert_field_rule(fast.out, low, ref.out, rows)
    plain = eager_low(qq, k, v, scale=d**-0.5, ranges=ranges)
    assert max_err(ref.out, plain, rows) > 0.25, "ACT must change the output, or the comparison proves little"


@pytest.mark.parametrize(("lk", "d"), [(1024, 128), (4096, 128), (16384, 128), (1024, 256), (4096, 256)])
def test_act_prefill(monkeypatch, lk, d):
    check_act(monkeypatch, b=1, lq=lk, lk=lk, d=d, pads=(0,), kind="causal")


@pytest.mark.parametrize("kind", ["ranges", "hf4d"])
@pytest.mark.parametrize("d", [128, 256])
def test_act_left_padded(monkeypatch, kind, d):
    check_act(monkeypatch, b=2, lq=1536, lk=1536, d=d, pads=(0, 301), kind=kind)


@pytest.mark.parametrize("kind", ["ranges", "hf4d"])
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("lq", [1, 7])
def test_act_decode_and_chunk(monkeypatch, lq, d, kind):
    check_act(monkeypatch, b=2, lq=lq, lk=4096, d=d, pads=(0, 517), kind=kind)


def test_repeated_calls_are_bitwise_equal(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    q, k, v, _ = planted(2, 4096, 4096, 128, starts=(0, 517))
    mask = padding_ranges(padding_mask(2, 4096, (0, 517)), 4096)
    first, again = (attention(q, k, v, mask=mask, return_lse=True) for _ in range(2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    act = dict(scale=128**-0.5, beta=BETA, threshold=THRESHOLD, mask=mask)
    first, again = (act_attention(q, k, v, **act) for _ in range(2))
    assert first.sinks.any()
    assert torch.equal(first.out, again.out) and torch.equal(first.sinks, again.sinks)
    assert torch.equal(first.stats.colsum, again.stats.colsum)
    decode = dict(act, mask=padding_ranges(padding_mask(2, 4096, (0, 517)), 1), history=first.stats)  # any history
    first, again = (act_attention(q[:, :, -1:], k, v, **decode) for _ in range(2))
    assert torch.equal(first.out, again.out)
