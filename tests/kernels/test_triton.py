"""Triton kernels (in Triton's CPU interpreter here, on the GPU with the `gpu` suite) against the float64 oracle.

Inputs are drawn on the CPU (same seeds, same values everywhere) and moved to TRITON_DEVICE, where the kernels, the
oracle and the PyTorch-path baselines all run.

Every call forces ATTNPATCH_BACKEND=triton, so a kernel that cannot take an input fails loudly instead of quietly
handing it to the PyTorch path. Tolerance rule of the field: error vs the fp64 oracle at most twice the error of the
same math in PyTorch (our PyTorch path for fp32, the math in the input dtype for fp16) plus 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from attnpatch.kernels import Tiles, backend, kernel_options, reference
from attnpatch.kernels.act import CLOSED_FORM_GUARD, act_attention
from attnpatch.kernels.attention import attention
from attnpatch.kernels.column_mass import ColumnStats, column_mass
from attnpatch.kernels.masking import KeyRanges, padding_ranges

from devices import TRITON_DEVICE, on_triton_device
from kernel_inputs import causal_mask, planted

pytestmark = pytest.mark.skipif(backend.triton_version() is None, reason="triton is not installed")

ACT = dict(scale=0.25, beta=0.4, threshold=0.1)


@pytest.fixture
def triton_backend(monkeypatch):
    if not torch.cuda.is_available() and not backend.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    return TRITON_DEVICE


def strided(b, h, length, d, *, dtype, seed):
    """Random [B, H, L, D] as transformers passes it: a transposed view of [B, L, H, D] memory, on TRITON_DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, h, d, generator=g).to(dtype).to(TRITON_DEVICE).transpose(1, 2)


def lowp_attention(q, k, v, **kw):
    """The attention math in the input dtype (softmax in fp32, as flash-attention's reference does)."""
    probs = reference.attention_probs(q, k, **kw).to(q.dtype)
    return (probs @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)).double()


def torch_path(fn, *args, **kw):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(backend.ENV_VAR, "torch")
        return fn(*args, **kw)


ATTENTION_CASES = {
    # name: (b, hq, hkv, lq, lk, d, geometry)
    "causal-77-gqa4": (1, 4, 1, 77, 77, 64, dict(causal=True)),
    "bidirectional-odd": (2, 2, 2, 7, 130, 32, dict()),
    "decode-gqa8": (2, 8, 1, 1, 130, 64, dict(causal=True)),
    "window": (1, 2, 1, 40, 40, 32, dict(causal=True, sliding_window=9)),
    "softcap-gqa2": (1, 4, 2, 33, 33, 16, dict(causal=True, softcap=3.0)),
    "head-dim-96": (1, 2, 2, 1, 33, 96, dict()),
    "head-dim-128": (1, 2, 1, 17, 17, 128, dict(causal=True)),
    "head-dim-256": (1, 2, 1, 7, 19, 256, dict()),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_oracle(triton_backend, case, dtype):
    b, hq, hkv, lq, lk, d, geometry = ATTENTION_CASES[case]
    q = strided(b, hq, lq, d, dtype=dtype, seed=1)
    k = strided(b, hkv, lk, d, dtype=dtype, seed=2)
    v = strided(b, hkv, lk, d, dtype=dtype, seed=3)
    kw = dict(scale=d**-0.5, **geometry)
    out, lse = attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    if dtype == torch.float32:
        base = torch_path(attention, q, k, v, **kw).double()
    else:
        base = lowp_attention(q, k, v, **kw)
    bound = 2 * (base - ref_out).abs().max().item() + 1e-5
    assert out.dtype == dtype and out.shape == (b, hq, lq, d)
    assert (out.double() - ref_out).abs().max().item() <= bound
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-4


@pytest.mark.parametrize("lq", [1, 7, 29])
def test_attention_left_padding_and_cache_offsets(triton_backend, lq):
    """A left-padded batch whose queries are the last Lq positions (KV cache before them), as a transformers 4-D
    mask and as KeyRanges from the 2-D padding mask: both equal the oracle; rows that see nothing are 0."""
    lk, d = 29, 32
    q = strided(2, 4, lq, d, dtype=torch.float32, seed=4)
    k = strided(2, 2, lk, d, dtype=torch.float32, seed=5)
    v = strided(2, 2, lk, d, dtype=torch.float32, seed=6)
    pad = torch.ones(2, lk, dtype=torch.long, device=TRITON_DEVICE)
    pad[1, :11] = 0
    mask4d = on_triton_device(causal_mask(2, lq, lk, pad=[0, 11]))
    ref_out, _ = reference.attention(q, k, v, scale=0.2, mask=mask4d)
    for mask in (mask4d, padding_ranges(pad, lq)):
        out = attention(q, k, v, scale=0.2, mask=mask)
        assert (out.double() - ref_out).abs().max().item() <= 1e-5


def test_attention_rows_that_see_nothing_give_zero(triton_backend):
    q = strided(1, 2, 5, 16, dtype=torch.float32, seed=7)
    k = strided(1, 2, 9, 16, dtype=torch.float32, seed=8)
    ranges = on_triton_device(
        KeyRanges(lo=torch.tensor([[0, 3, 9, 4, 0]], dtype=torch.int32), hi=torch.tensor([[9, 3, 9, 2, 1]]))
    )
    out, lse = attention(q, k, k, mask=ranges, return_lse=True)
    assert out[:, :, 1:4].abs().max() == 0 and torch.isinf(lse[:, :, 1:4]).all()
    ref_out, _ = reference.attention(q, k, k, scale=0.25, mask=ranges)
    assert (out.double() - ref_out).abs().max() <= 1e-5


@pytest.mark.parametrize("lq, lk, hkv", [(77, 77, 4), (1, 130, 1), (7, 40, 2)])
def test_column_mass_matches_oracle(triton_backend, lq, lk, hkv):
    q, k, v, mask = on_triton_device(*planted(2, 4, hkv, lq, lk, 32, seed=lq), causal_mask(2, lq, lk, pad=[0, 5]))
    _, lse = attention(q, k, v, scale=0.25, mask=mask, return_lse=True)
    stats = column_mass(q, k, lse, scale=0.25, mask=mask)
    ref = reference.act(q, k, v, mask=mask, **ACT)
    assert (stats.colsum.double() - ref["colsum"]).abs().max() <= 1e-5
    assert torch.equal(stats.count.double(), ref["count"])


ACT_CASES = {
    # name: (b, hq, hkv, lq, lk, d, pad per sequence, extra)
    "prefill-padded-gqa2": (2, 4, 2, 77, 77, 32, [0, 6], dict()),
    "prefill-gqa4": (1, 8, 2, 130, 130, 32, None, dict()),
    "chunk-7": (2, 4, 4, 7, 40, 32, [3, 0], dict()),
    "window-no-mask": (1, 4, 1, 41, 41, 16, None, dict(causal=True, sliding_window=12)),
    "min-rows-softcap": (1, 2, 1, 33, 33, 32, None, dict(causal=True, min_visible_rows=8, softcap=6.0)),
}


@pytest.mark.parametrize("case", list(ACT_CASES))
def test_act_matches_oracle(triton_backend, case):
    b, hq, hkv, lq, lk, d, pad, extra = ACT_CASES[case]
    q, k, v = on_triton_device(*planted(b, hq, hkv, lq, lk, d, sinks=(0, 5, 9), seed=lq + hq))
    geometry = on_triton_device(dict(mask=causal_mask(b, lq, lk, pad=pad)) if "causal" not in extra else {})
    ref = reference.act(q, k, v, **ACT, **geometry, **extra)
    fast = act_attention(q, k, v, **ACT, **geometry, **extra)
    slow = torch_path(act_attention, q, k, v, **ACT, **geometry, **extra)
    assert ref["sinks"][..., -lk:].sum() > 0, "the planted sinks must be found, or the test proves nothing"
    assert torch.equal(fast.sinks, ref["sinks"][..., -lk:])
    torch_err = (slow.out.double() - ref["out"]).abs().max().item()
    assert (fast.out.double() - ref["out"]).abs().max().item() <= 2 * torch_err + 1e-5
    assert torch.allclose(fast.stats.colsum.double(), ref["colsum"], atol=1e-5)


def test_act_fp16_within_twice_torch_error(triton_backend):
    q, k, v = on_triton_device(*planted(2, 4, 2, 33, 33, 32, dtype=torch.float16, seed=3))
    mask = on_triton_device(causal_mask(2, 33, 33, pad=[0, 4]))
    ref = reference.act(q, k, v, mask=mask, **ACT)
    fast = act_attention(q, k, v, mask=mask, **ACT)
    low = (ref["probs"].to(torch.float16) @ v.repeat_interleave(2, dim=1)).double()
    bound = 2 * (low - ref["out"]).abs().max().item() + 1e-5
    assert fast.out.dtype == torch.float16 and (fast.out.double() - ref["out"]).abs().max().item() <= bound


def test_act_decode_steps_continue_the_statistic(triton_backend):
    """Prefill then three one-token steps with the running history: each step equals the oracle given the same
    history, and the Triton and PyTorch paths carry identical sink sets forward."""
    q, k, v = on_triton_device(*planted(2, 4, 2, 24, 24, 16, sinks=(0, 3), seed=11))
    pad = [0, 5]
    prefill_mask = on_triton_device(causal_mask(2, 21, 21, pad=pad))
    state = act_attention(q[:, :, :21], k[:, :, :21], v[:, :, :21], mask=prefill_mask, **ACT)
    for t in range(21, 24):
        mask = on_triton_device(causal_mask(2, 1, t + 1, pad=pad))
        history = (state.stats.colsum, state.stats.count)
        ref = reference.act(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], mask=mask, history=history, **ACT)
        step = act_attention(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], mask=mask, history=state.stats, **ACT
        )
        assert torch.equal(step.sinks, ref["sinks"])
        assert (step.out.double() - ref["out"]).abs().max() <= 1e-5
        state = step


def test_act_sliding_cache_key_offset(triton_backend):
    """Keys of a sliding-window cache start at an absolute offset: the history is indexed by absolute position."""
    q, k, v = on_triton_device(*planted(1, 2, 1, 1, 12, 16, sinks=(2,), seed=5))
    history = on_triton_device(ColumnStats(colsum=torch.rand(1, 2, 30) * 3, count=torch.full((1, 1, 30), 6.0)))
    ref = reference.act(q, k, v, history=(history.colsum, history.count), key_offset=18, **ACT)
    fast = act_attention(q, k, v, history=history, key_offset=18, **ACT)
    assert torch.equal(fast.sinks, ref["sinks"][..., 18:])
    assert (fast.out.double() - ref["out"]).abs().max() <= 1e-5


def test_act_rows_with_sink_mass_near_one_are_exact(triton_backend):
    """When the corrected sinks hold almost all of a row's mass, o - A_S is mostly rounding error; those rows are
    recomputed from full logits and still match the oracle."""
    q, k, v = on_triton_device(*planted(1, 2, 1, 20, 20, 16, sinks=(2, 3), seed=2))
    k[:, :, 2:4] *= 4.0  # two overwhelming sinks; keep_first_sink=False so both are corrected
    mask = on_triton_device(causal_mask(1, 20, 20))
    kw = dict(ACT, keep_first_sink=False, mask=mask)
    ref = reference.act(q, k, v, **kw)
    probs = reference.attention_probs(q, k, scale=0.25, mask=mask)
    near_one = probs[..., 2:4].sum(-1) > 1 - CLOSED_FORM_GUARD
    assert near_one.sum() >= 20, "the setup must put nearly all mass of many rows on the sinks"
    fast = act_attention(q, k, v, **kw)
    assert (fast.out.double() - ref["out"]).abs().max() <= 1e-5
    slow = torch_path(act_attention, q, k, v, **kw)  # the PyTorch path must not cancel either
    assert (slow.out.double() - ref["out"]).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(1, 2, 5, 16, dtype=torch.float64), {}), "dtype torch.float64"),
        (lambda: (torch.randn(1, 2, 5, 512), {}), "head dim 512"),
        (lambda: (torch.randn(1, 2, 5, 16), {"mask": torch.rand(1, 1, 5, 5) > 0.5}), "one interval per row"),
        (lambda: (torch.randn(1, 2, 5, 16), {"mask": torch.randn(1, 1, 5, 5)}), "bias"),
    ],
)
def test_forced_triton_rejects_what_it_cannot_run(triton_backend, make, message):
    x, kw = on_triton_device(*make())
    if "mask" in kw and kw["mask"].dtype == torch.bool:
        kw["mask"][..., 0] = True
        kw["mask"][..., 1] = False
        kw["mask"][..., 2] = True
    with pytest.raises(backend.BackendError, match=message):
        attention(x, x, x, **kw)
    with pytest.raises(backend.BackendError, match="output_attentions"):
        act_attention(x.float()[..., :16], x.float()[..., :16], x.float()[..., :16], return_probs=True, **ACT)


def test_automatic_choice_falls_back_with_one_notice(monkeypatch, caplog):
    """On CUDA the automatic choice hands what Triton cannot run to the PyTorch path and says why, once."""
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "_noticed", set())
    cuda = torch.device("cuda")
    with caplog.at_level("WARNING", logger="attnpatch"):
        assert backend.choose("attention", cuda, "dtype torch.float64") == "torch"
        assert backend.choose("attention", cuda, "dtype torch.float64") == "torch"
        assert backend.choose("attention", cuda, None) == "triton"
        assert backend.choose("attention", torch.device("cpu"), None) == "torch"
    notices = [r.message for r in caplog.records if "float64" in r.message]
    assert len(notices) == 1 and "PyTorch path" in notices[0]


def test_unknown_backend_value_is_an_error(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        attention(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))


def test_info_names_the_active_path(monkeypatch):
    from attnpatch.info import active_path

    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert active_path().startswith("active: torch (forced by ATTNPATCH_BACKEND=torch)")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    expected = "active: triton" if torch.cuda.is_available() or backend.interpreting() else "active: error"
    assert active_path().startswith(expected)
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    assert "not one of" in active_path()


@pytest.mark.parametrize("lq, splits", [(1, 3), (1, 8), (7, 2)])
def test_split_kv_decode_merges_exactly(triton_backend, lq, splits):
    """Flash-decoding: keys split over programs, partial results merged by LSE; padded rows and rows whose keys all
    fall in one split included."""
    from attnpatch.kernels._triton.flash import flash_forward

    lk = 150
    q = strided(2, 8, lq, 32, dtype=torch.float32, seed=9)
    k = strided(2, 2, lk, 32, dtype=torch.float32, seed=10)
    v = strided(2, 2, lk, 32, dtype=torch.float32, seed=11)
    pad = torch.ones(2, lk, dtype=torch.long, device=TRITON_DEVICE)
    pad[1, :100] = 0  # sequence 1 only has keys in the last splits
    ranges = padding_ranges(pad, lq)
    out, lse = flash_forward(q, k, v, ranges, scale=0.2, num_splits=splits)
    ref_out, ref_lse = reference.attention(q, k, v, scale=0.2, mask=ranges)
    assert (out.double() - ref_out).abs().max() <= 1e-5
    assert (lse.double() - ref_lse).abs().max() <= 1e-5


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("heads", ["groups", "subset"])
def test_decode_folded_groups_and_logits(triton_backend, heads, splits):
    """Decode with grouped heads runs each kv head's query heads as one program's rows; a non-standard head map runs
    one program per query head. Either way: the oracle's output and LSE, the same result with folding switched off,
    and the logits buffer holds each row's base-2 logits on the keys it sees and -inf elsewhere (a fully padded
    sequence's row sees nothing: LSE -inf, output 0)."""
    from attnpatch.kernels._triton import common, flash

    lk, d = 70, 48  # a head dim that is not a power of two
    q = strided(3, 8, 1, d, dtype=torch.float32, seed=12)
    k = strided(3, 2, lk, d, dtype=torch.float32, seed=13)
    v = strided(3, 2, lk, d, dtype=torch.float32, seed=14)
    kv_index = None if heads == "groups" else torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], device=TRITON_DEVICE)
    pad = torch.ones(3, lk, dtype=torch.long, device=TRITON_DEVICE)
    pad[1, :33] = 0
    pad[2] = 0
    ranges = padding_ranges(pad, 1)
    assert common.decode_group(q, k, kv_index) == (4 if heads == "groups" else 1)
    kv_rep = torch.arange(8, device=TRITON_DEVICE) // 4 if kv_index is None else kv_index
    ref_out, ref_lse = reference.attention(q, k[:, kv_rep], v[:, kv_rep], scale=0.2, mask=ranges)
    logits_ref, visible = reference._masked_logits(q, k[:, kv_rep], scale=0.2, mask=ranges)
    runs = []
    for fold in (True, False):
        logits = torch.full((3, 8, 1, lk), float("-inf"), device=TRITON_DEVICE)
        with kernel_options(fold_decode_groups=fold):
            out, lse = flash.flash_forward(
                q, k, v, ranges, scale=0.2, kv_head_index=kv_index, num_splits=splits, logits_out=logits
            )
        assert (out.double() - ref_out).abs().max() <= 1e-5
        seen = torch.isfinite(ref_lse)
        assert (lse.double() - ref_lse)[seen].abs().max() <= 1e-5 and torch.isinf(lse[~seen]).all()
        assert out[2].abs().max() == 0
        shown = visible.expand_as(logits)
        assert ((logits.double() - logits_ref * 1.4426950408889634)[shown]).abs().max() <= 1e-5
        assert torch.isinf(logits[~shown]).all() and (logits[~shown] < 0).all()
        runs.append((out, lse))
    assert (runs[0][0] - runs[1][0]).abs().max() <= 1e-6


def test_act_decode_mass_from_logits(triton_backend):
    """A decode step takes the column mass from the flash pass's logits: the oracle's statistic (history included)
    and sinks, and the same as the column-mass kernel's; a padded row of a padded prompt counts nothing."""
    q, k, v = on_triton_device(*planted(2, 8, 2, 1, 40, 32, sinks=(0, 6), seed=21))
    pad = [0, 9]
    g = torch.Generator().manual_seed(3)
    mean = torch.where(torch.rand(2, 8, 39, generator=g) > 0.9, 0.3, 0.02)  # clear of the threshold either way
    history = ColumnStats(colsum=mean * 9.0, count=torch.full((2, 1, 39), 9.0))
    history.count[1, :, :9] = 0.0
    history.colsum[1, :, :9] = 0.0
    history, mask = on_triton_device(history, causal_mask(2, 1, 40, pad=pad))
    ref = reference.act(q, k, v, mask=mask, history=(history.colsum, history.count), **ACT)
    runs = {}
    for from_logits in (True, False):
        with kernel_options(decode_mass_from_logits=from_logits):
            runs[from_logits] = act_attention(q, k, v, mask=mask, history=history, **ACT)
            skip_row_1 = torch.tensor([[True], [False]], device=TRITON_DEVICE)
            step = act_attention(q, k, v, mask=mask, history=history, query_valid=skip_row_1, **ACT)
        assert torch.equal(runs[from_logits].sinks, ref["sinks"])
        assert (runs[from_logits].stats.colsum.double() - ref["colsum"]).abs().max() <= 1e-6
        assert (runs[from_logits].out.double() - ref["out"]).abs().max() <= 1e-5
        assert torch.equal(step.stats.colsum[1, :, :39], history.colsum[1])
        assert torch.equal(step.stats.colsum[0], runs[from_logits].stats.colsum[0])
    assert (runs[True].stats.colsum - runs[False].stats.colsum).abs().max() <= 1e-6


def test_tile_overrides_change_tiles_not_results(triton_backend):
    """The per-kernel tiles that tune_tiles.py sweeps (`KernelOptions.tiles`): the kernels get the fixed tiles and
    still match the oracle (ACT through all three prefill kernels, left padding included)."""
    from attnpatch.kernels._triton import common

    q, k, v, mask = on_triton_device(
        *planted(2, 4, 2, 45, 45, 32, sinks=(0, 7), seed=31), causal_mask(2, 45, 45, pad=[0, 6])
    )
    ref = reference.act(q, k, v, mask=mask, **ACT)
    fixed = {kernel: Tiles(16, 16, 0, 4, 1) for kernel in ("flash", "column_mass", "sink_correction")}
    with kernel_options(tiles=fixed):
        assert common.tiles(32, torch.float32, 45, "flash") == Tiles(16, 16, 32, 4, 1)
        fast = act_attention(q, k, v, mask=mask, **ACT)
    assert torch.equal(fast.sinks, ref["sinks"]) and fast.sinks.any()
    assert (fast.out.double() - ref["out"]).abs().max() <= 1e-5
    assert (fast.stats.colsum.double() - ref["colsum"]).abs().max() <= 1e-5


def test_mask_conversion_is_remembered_within_a_forward_only(monkeypatch):
    """With a forward's memo passed, each 4-D mask tensor (inference tensors included) is checked and converted once;
    another tensor is converted afresh, a refused mask stays refused; without one nothing is remembered (an in-place
    edit between calls is seen)."""
    from attnpatch.kernels import masking

    calls = []
    convert = masking._mask_ranges
    monkeypatch.setattr(masking, "_mask_ranges", lambda *a, **kw: calls.append(1) or convert(*a, **kw))
    geometry = dict(causal=True, sliding_window=None, device=torch.device("cpu"))
    with torch.inference_mode():
        mask = causal_mask(2, 5, 9, pad=[0, 3])
    memo: masking.MaskMemo = {}
    first, _ = masking.to_key_ranges(mask, 2, 5, 9, **geometry, memo=memo)
    again, _ = masking.to_key_ranges(mask, 2, 5, 9, **geometry, memo=memo)
    assert again is first and len(calls) == 1 and first.lo[1].tolist() == [3] * 5
    masking.to_key_ranges(causal_mask(2, 5, 9, pad=[0, 3]), 2, 5, 9, **geometry, memo=memo)
    assert len(calls) == 2
    holes = causal_mask(1, 2, 6)
    holes[..., 2] = False  # two intervals per row
    for _ in range(2):
        ranges, reason = masking.to_key_ranges(holes, 1, 2, 6, **geometry, memo=memo)
        assert ranges is None and "not one interval" in reason
    assert len(calls) == 3
    with torch.inference_mode():
        mask[1, :, :, 3] = False  # key 3 hidden too: an in-place edit between forwards
    changed, _ = masking.to_key_ranges(mask, 2, 5, 9, **geometry)
    assert len(calls) == 4 and changed.lo[1].tolist() == [4] * 5
    masking.to_key_ranges(mask, 2, 5, 9, **geometry)
    assert len(calls) == 5


def test_patched_forward_converts_its_mask_once(triton_backend, monkeypatch):
    """A patched model's forward (padded batch, so transformers passes a 4-D mask to every layer) converts the mask
    once, under inference mode too; the memo belongs to that forward (the next forward, also after one that raised,
    converts afresh), and nothing module-level holds it."""
    import attnpatch
    from attnpatch.kernels import masking

    from tiny_models import tiny_model

    calls = []
    convert = masking._mask_ranges
    monkeypatch.setattr(masking, "_mask_ranges", lambda *a, **kw: calls.append(1) or convert(*a, **kw))
    model = tiny_model("llama").to(TRITON_DEVICE)
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :3] = 0
    ids, pad = on_triton_device(ids, pad)
    with attnpatch.patched(model, "act", heads="all") as patch, torch.inference_mode():
        model(ids, attention_mask=pad)
        assert len(calls) == 1 and patch.integration.current() is None
        # raises in the embedding (float ids, not out-of-range ones: on CUDA those trip a device-side assert that
        # breaks the process's CUDA context instead of raising)
        with pytest.raises(RuntimeError, match="indices"):
            model(ids.float(), attention_mask=pad)
        model(ids, attention_mask=pad)
        assert len(calls) == 2 and patch.integration.current() is None


def test_padding_ranges_with_an_empty_row_and_bad_key_offset():
    ranges = padding_ranges(torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]]), 4)
    assert ranges.nonempty().tolist() == [[True] * 4, [False] * 4, [False, False, True, True]]
    q = torch.randn(1, 2, 1, 8)
    history = ColumnStats(colsum=torch.rand(1, 2, 9), count=torch.ones(1, 1, 9))
    with pytest.raises(ValueError, match="key_offset is the absolute position"):
        act_attention(q, q.repeat(1, 1, 5, 1), q.repeat(1, 1, 5, 1), history=history, key_offset=3, **ACT)
