"""PyTorch's CPU flash kernel as the first pass (kernels.platform_flash) against the float64 oracle, in every dtype and
mask form, and proof of which path each op's call takes (the profiler sees the aten kernel or not)."""

from __future__ import annotations

import pytest
import torch

from attnpatch.kernels import platform_flash, reference
from attnpatch.kernels.act import act_attention
from attnpatch.kernels.attention import attention
from attnpatch.kernels.masking import KeyRanges, padding_ranges
from attnpatch.kernels.var import var_attention

from kernel_inputs import causal_mask, planted

FLASH_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"
ACT = dict(scale=0.25, beta=0.4, threshold=0.1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(
    platform_flash.unsupported(torch.zeros(1), softcap=None) is not None, reason="this torch has no CPU flash kernel"
)


def _alibi_mask(b, lq, lk, pad):
    """Additive float mask with a per-key bias (ALiBi-like) where visible, finfo.min where hidden."""
    visible = causal_mask(b, lq, lk, pad=pad)
    bias = -0.3 * (torch.arange(lk).float() - torch.arange(lq)[:, None].float() - (lk - lq)).abs()
    return torch.where(visible, bias, torch.finfo(torch.float32).min)


def _ranges_case(b, lq, lk):
    attention_mask = torch.ones(b, lk, dtype=torch.long)
    attention_mask[1, :4] = 0
    ranges = padding_ranges(attention_mask, lq, sliding_window=9)
    return ranges, ranges.visibility(0, lq, lk)


# (name, lq, lk, geometry for our op, geometry for the oracle)
def _cases():
    b, lk = 2, 37
    ranges, dense = _ranges_case(b, 13, lk)
    empty = causal_mask(b, 11, lk, pad=[0, 3])
    empty[1, :, :2] = False  # two rows of sequence 1 see nothing
    return [
        ("causal no mask", 37, 37, dict(causal=True), dict(causal=True)),
        ("bidirectional no mask", 21, 37, dict(causal=False), dict(causal=False)),
        ("decode no mask", 1, 37, dict(causal=True), dict(causal=True)),
        ("window no mask", 37, 37, dict(causal=True, sliding_window=7), dict(causal=True, sliding_window=7)),
        ("4-D bool, padding, chunk after a cache", 11, 37, dict(mask=causal_mask(b, 11, lk, pad=[0, 5])), None),
        ("4-D additive with a bias", 9, 37, dict(mask=_alibi_mask(b, 9, lk, pad=[3, 0])), None),
        ("rows that see nothing", 11, 37, dict(mask=empty), None),
        ("KeyRanges: padding and a window", 13, 37, dict(mask=ranges), dict(mask=dense)),
    ]


CASES = _cases()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", [(4, 1, None), (4, 2, None), (4, 2, torch.tensor([1, 0, 0, 1]))], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_with_lse_matches_oracle(case, groups, dtype):
    name, lq, lk, geometry, oracle_geometry = case
    hq, hkv, kv_head_index = groups
    q, k, v = planted(2, hq, hkv, lq, lk, 16, dtype=dtype, seed=lq + hkv)
    if kv_head_index is not None:  # the oracle repeats K/V per consecutive group: give it the gathered heads
        k_o, v_o = k[:, kv_head_index], v[:, kv_head_index]
    else:
        k_o, v_o = k, v
    geometry = {"causal": False, "sliding_window": None, "mask": None, **geometry}
    out, lse = platform_flash.flash_with_lse(
        q, k, v, scale=0.25, kv_head_index=kv_head_index, rows_per_call=4, **geometry
    )
    ref_out, ref_lse = reference.attention(q, k_o, v_o, scale=0.25, **(oracle_geometry or geometry))
    assert out.dtype == lse.dtype == torch.float32
    # inputs are exact in float32, so the float32 kernel is held to float32 error whatever the input dtype
    assert (out.double() - ref_out).abs().max() <= 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows that see nothing must give -inf"
    assert (lse.double() - ref_lse)[finite].abs().max() <= 1e-5
    if name == "rows that see nothing":
        assert (~finite).any() and out[~finite].abs().max() == 0


def _calls_flash(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.key == FLASH_OP for event in prof.key_averages())


def test_each_op_takes_the_path_it_should():
    q, k, v = planted(2, 4, 2, 24, 24, 16, seed=1)
    mask = causal_mask(2, 24, 24, pad=[0, 3])
    assert _calls_flash(lambda: attention(q, k, v, mask=mask, return_lse=True))
    assert _calls_flash(lambda: act_attention(q, k, v, mask=mask, **ACT))
    assert _calls_flash(lambda: act_attention(q, k, v, causal=True, sliding_window=5, **ACT))
    ranges = KeyRanges(lo=torch.zeros(2, 24, dtype=torch.int32), hi=torch.full((2, 24), 24, dtype=torch.int32))
    assert _calls_flash(lambda: act_attention(q, k, v, mask=ranges, **ACT))
    # softcapping is not in the kernel; the probabilities for output_attentions come from the blocked path
    assert not _calls_flash(lambda: attention(q, k, v, mask=mask, softcap=5.0))
    assert not _calls_flash(lambda: act_attention(q, k, v, mask=mask, softcap=5.0, **ACT))
    # VAR: the kernel runs the rows VAR leaves alone; when it may change every row, none
    sinks = torch.zeros(2, 24, dtype=torch.bool)
    sinks[:, 0] = True
    image = torch.zeros(2, 24, dtype=torch.bool)
    image[:, :12] = True
    text_rows = torch.zeros(2, 24, dtype=torch.bool)
    text_rows[:, 18:] = True
    var = dict(scale=0.25, sinks=sinks, image=image, mask=mask)
    assert _calls_flash(lambda: var_attention(q, k, v, rows=text_rows, **var))
    assert not _calls_flash(lambda: var_attention(q, k, v, rows=torch.ones(2, 24, dtype=torch.bool), **var))
    assert not _calls_flash(lambda: var_attention(q, k, v, rows=text_rows, return_probs=True, **var))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_var_rows_from_the_kernel_match_oracle(dtype):
    """The rows VAR changes are recomputed, the others come from the kernel: all of them exact."""
    b, lq, lk = 2, 30, 30
    q, k, v = planted(b, 4, 2, lq, lk, 16, dtype=dtype, seed=7, sinks=(0, 3))
    mask = causal_mask(b, lq, lk, pad=[0, 2])
    sinks = torch.zeros(b, lk, dtype=torch.bool)
    sinks[:, 3] = True
    image = torch.zeros(b, lk, dtype=torch.bool)
    image[:, 3:20] = True
    rows = torch.zeros(b, lq, dtype=torch.bool)
    rows[:, 22:27] = True
    rows[1, 28] = True  # two runs of rows in sequence 1
    rule = dict(scale=0.25, sinks=sinks, image=image, rows=rows, mask=mask, keep_fraction=0.6, rho=0.5, summ=0.2)
    fast = var_attention(q, k, v, return_selected=True, **rule)
    assert _calls_flash(lambda: var_attention(q, k, v, **rule))
    ref = reference.var(q, k, v, **rule)
    assert fast.selected.any(), "some rows must be redistributed, otherwise the test proves nothing"
    assert torch.equal(fast.selected, ref["selected"])
    assert (fast.out.double() - ref["out"]).abs().max() <= (1e-5 if dtype == torch.float32 else _ulp(ref["out"], dtype))


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of the largest |x| in `dtype` (the rounding of the output to the input dtype)."""
    return float(torch.finfo(dtype).eps * x.abs().max())
