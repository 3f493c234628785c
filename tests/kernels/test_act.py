"""kernels.act (the memory-safe PyTorch path) against kernels.reference (materialised float64 oracle)."""

from __future__ import annotations

import pytest
import torch

from attnpatch.kernels import reference
from attnpatch.kernels.act import ColumnStats, act_attention

from kernel_inputs import causal_mask, planted

ACT = dict(scale=0.25, beta=0.4, threshold=0.1)


def check(q, k, v, tol, **kw):
    ref = reference.act(q, k, v, **{**ACT, **kw})
    fast = act_attention(q, k, v, block_elements=97, **{**ACT, **kw})  # tiny blocks: many row blocks
    err = (fast.out.double() - ref["out"]).abs().max().item()
    assert err <= tol, err
    assert torch.equal(fast.sinks, ref["sinks"][..., -k.shape[2] :])
    return ref, fast


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("lq", [1, 7, 23])
def test_fp32_matches_oracle(causal, groups, lq):
    lk = 23
    q, k, v = planted(2, 4, 4 // groups, lq, lk, 16, seed=lq * 10 + groups)
    mask = causal_mask(2, lq, lk, pad=[0, 3]) if causal else None
    if not causal:  # padding on a bidirectional layer: hide three keys of row 1 from every query
        mask = torch.ones(2, 1, lq, lk, dtype=torch.bool)
        mask[1, :, :, :3] = False
    ref, fast = check(q, k, v, 1e-5, mask=mask)
    assert ref["sinks"].any(), "the planted sink must be detected, otherwise the test proves nothing"
    plain, _ = reference.attention(q, k, v, scale=0.25, mask=mask)
    assert (fast.out.double() - plain).abs().max() > 1e-3, "ACT must change the output where sinks exist"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    """Field rule: error vs the fp64 oracle at most 2x that of the same math done in PyTorch at the input dtype."""
    q, k, v = planted(2, 4, 2, 19, 19, 32, dtype=dtype, seed=3)
    mask = causal_mask(2, 19, 19, pad=[0, 4])
    ref = reference.act(q, k, v, mask=mask, **ACT)
    fast = act_attention(q, k, v, mask=mask, **ACT)
    # the same math in the input dtype: the oracle's calibrated probabilities applied to V in `dtype`
    vv = v.repeat_interleave(2, dim=1)
    low = (ref["probs"].to(dtype) @ vv).double()
    torch_err = (low - ref["out"]).abs().max().item()
    err = (fast.out.double() - ref["out"]).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)


def test_sliding_window_and_softcap_without_mask():
    q, k, v = planted(1, 4, 2, 17, 17, 16, seed=5)
    check(q, k, v, 1e-5, causal=True, sliding_window=6, softcap=5.0)


def test_additive_float_mask():
    q, k, v = planted(2, 4, 4, 9, 9, 16, seed=6)
    bool_mask = causal_mask(2, 9, 9, pad=[0, 2])
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    _, fast_bool = check(q, k, v, 1e-5, mask=bool_mask)
    _, fast_float = check(q, k, v, 1e-5, mask=float_mask)
    assert torch.allclose(fast_bool.out, fast_float.out, atol=1e-6)


@pytest.mark.parametrize("keep_first_sink", [True, False])
@pytest.mark.parametrize("min_rows", [1, 4])
def test_options(keep_first_sink, min_rows):
    q, k, v = planted(2, 4, 2, 15, 15, 16, seed=7)
    check(
        q,
        k,
        v,
        1e-5,
        mask=causal_mask(2, 15, 15, pad=[0, 2]),
        keep_first_sink=keep_first_sink,
        min_visible_rows=min_rows,
    )


def test_first_kept_sink_is_first_real_token_of_each_row():
    """With left padding the kept sink is the first real token, not position 0 (a pad key)."""
    q, k, v = planted(2, 4, 4, 12, 12, 16, sinks=(0, 3, 8), seed=8)
    k[1, :, 3] = k[0, :, 0]  # row 1 is padded by 3: its first real token is a sink too
    mask = causal_mask(2, 12, 12, pad=[0, 3])
    _, fast = check(q, k, v, 1e-5, mask=mask)
    assert not fast.sinks[0, :, 0].any() and fast.sinks[0, :, 8].any()
    assert not fast.sinks[1, :, :4].any() and fast.sinks[1, :, 8].any()


def test_beta_one_and_no_sink_are_identity():
    q, k, v = planted(2, 4, 2, 11, 11, 16, seed=9)
    mask = causal_mask(2, 11, 11, pad=[0, 2])
    plain, _ = reference.attention(q, k, v, scale=0.25, mask=mask)
    for kw in (dict(beta=1.0, threshold=0.1), dict(beta=0.4, threshold=1.0)):
        out = act_attention(q, k, v, scale=0.25, mask=mask, **kw).out
        valid = mask.any(-1).squeeze(1)  # real rows
        assert (out.double() - plain).abs()[valid[:, None].expand(-1, 4, -1)].max() < 1e-6


def test_rows_stay_normalised_and_all_sink_rows_unchanged():
    q, k, v = planted(1, 2, 2, 6, 6, 8, sinks=(0, 1, 2, 3, 4, 5), seed=10)
    out = act_attention(
        q,
        k,
        v,
        mask=causal_mask(1, 6, 6),
        return_probs=True,
        keep_first_sink=False,
        scale=0.25,
        beta=0.4,
        threshold=0.0,
    )
    assert torch.allclose(out.probs.sum(-1), torch.ones(1, 2, 6), atol=1e-6)
    plain = reference.attention_probs(q, k, scale=0.25, mask=causal_mask(1, 6, 6))
    assert torch.allclose(out.probs.double(), plain, atol=1e-6)  # every key is a sink: nothing to give mass to


def test_running_history_equals_one_pass():
    """Chunked prefill: two calls with the running statistic give the oracle's statistic for the whole sequence,
    and the second chunk's rows get exactly the one-pass output."""
    q, k, v = planted(2, 4, 2, 20, 20, 16, seed=11)
    mask = causal_mask(2, 20, 20, pad=[0, 5])
    full = reference.act(q, k, v, mask=mask, **ACT)
    first = act_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], mask=mask[:, :, :12, :12], **ACT)
    second = act_attention(q[:, :, 12:], k, v, mask=mask[:, :, 12:], history=first.stats, key_offset=0, **ACT)
    assert torch.allclose(second.stats.colsum.double(), full["colsum"], atol=1e-5)
    assert torch.allclose(second.stats.count.double(), full["count"], atol=0)
    assert (second.out.double() - full["out"][:, :, 12:]).abs().max() < 1e-5


def test_history_with_sliding_keys():
    """A sliding cache hands only the last Lk keys: key_offset places them at their absolute positions."""
    q, k, v = planted(1, 4, 2, 1, 30, 16, sinks=(0, 20), seed=12)
    hist = ColumnStats(colsum=torch.rand(1, 4, 29), count=torch.full((1, 1, 29), 3.0))
    hist.colsum[..., 20] = 2.0  # key 20 has mean 2/3 so far
    window = act_attention(q, k[:, :, 18:], v[:, :, 18:], history=hist, key_offset=18, **ACT)
    ref = reference.act(q, k[:, :, 18:], v[:, :, 18:], history=(hist.colsum, hist.count), key_offset=18, **ACT)
    assert torch.equal(window.sinks, ref["sinks"][..., 18:])
    assert (window.out.double() - ref["out"]).abs().max() < 1e-5
    assert window.stats.colsum.shape[-1] == 30
