"""VAR attention (PyTorch path and Triton kernel) against the float64 oracle that applies the rule row by row.

Inputs plant a visual sink inside an image span, a text sink at position 0 and a pull of every query toward the image,
so some (head, row) pairs are image-centric and some are not. Tolerance rule: error vs the oracle at most twice the
error of the same math in PyTorch at the input dtype, plus 1e-5; the selection must match exactly.
"""

from __future__ import annotations

import pytest
import torch

from attnpatch.kernels import backend, kernel_options, reference
from attnpatch.kernels.masking import padding_ranges
from attnpatch.kernels.var import var_attention

from devices import TRITON_DEVICE, on_device, on_triton_device
from kernel_inputs import causal_mask

SCALE = 0.25


def var_inputs(b, hq, hkv, lq, lk, d, *, image=(4, 20), visual_sinks=(9,), text_sinks=(0,), seed=0, dtype=None):
    """q/k/v with sinks (strong keys) and an image span that attracts some heads; masks [B, Lk] for sinks/image."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    u, w = torch.randn(2, d, generator=g)
    u, w = u / u.norm(), w / w.norm()
    strength = torch.linspace(0.0, 3.0, hq)[None, :, None, None]  # heads differ in how much they look at the image
    q = q + 2.5 * u + strength * w
    sinks = torch.zeros(b, lk, dtype=torch.bool)
    img = torch.zeros(b, lk, dtype=torch.bool)
    img[:, image[0] : image[1]] = True
    for s in (*visual_sinks, *text_sinks):
        k[:, :, s] += 2.5 * u
        sinks[:, s] = True
    k[:, :, image[0] : image[1]] += 1.5 * w
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v, sinks, img


def run(path, q, k, v, **kw):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(backend.ENV_VAR, path)
        return var_attention(q, k, v, scale=SCALE, return_selected=True, **kw)


def on_path_device(path, *xs):
    """The arguments where `path` runs: on TRITON_DEVICE for the Triton kernel, left on the CPU for PyTorch."""
    return on_device(TRITON_DEVICE if path == "triton" else "cpu", *xs)


def oracle(q, k, v, *, sinks, image, rows=None, **kw):
    return reference.var(q, k, v, scale=SCALE, sinks=sinks, image=image, rows=rows, **kw)


def paths():
    out = ["torch"]
    if backend.triton_version() is not None and (torch.cuda.is_available() or backend.interpreting()):
        out.append("triton")
    return out


CASES = {
    # name: (b, hq, hkv, lq, lk, d, causal, rows from position)
    "prefill-causal": (1, 4, 4, 40, 40, 16, True, 20),
    "prefill-gqa4": (2, 8, 2, 45, 45, 32, True, 20),
    "decode-gqa2": (2, 4, 2, 1, 70, 16, True, 0),
    "seven-rows": (1, 4, 1, 7, 50, 64, False, 0),
}


@pytest.fixture(params=[None, 3], ids=["one-key-range", "three-key-ranges"])
def key_ranges(request, monkeypatch):
    """The Triton kernel with its keys split over 3 programs per query block and the partial results merged (on the
    GPU this happens by occupancy, mostly in decode)."""
    if request.param is not None and backend.triton_version() is not None:
        from attnpatch.kernels._triton import var as var_kernel

        monkeypatch.setattr(var_kernel, "key_splits", lambda *args: request.param)
    return request.param


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("convention", ["paper", "code"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(path, convention, case, key_ranges):
    if path == "torch" and key_ranges:
        pytest.skip("key ranges are a Triton kernel option")
    b, hq, hkv, lq, lk, d, causal, first_row = CASES[case]
    q, k, v, sinks, img = var_inputs(b, hq, hkv, lq, lk, d, seed=list(CASES).index(case))
    rows = torch.zeros(b, lq, dtype=torch.bool)
    rows[:, first_row:] = True
    q, k, v, sinks, img, rows = on_path_device(path, q, k, v, sinks, img, rows)
    rule = dict(keep_fraction=0.6, rho=0.5 if convention == "code" else 0.8, summ=0.2, convention=convention)
    want = oracle(q, k, v, sinks=sinks, image=img, rows=rows, causal=causal, **rule)
    got = run(path, q, k, v, sinks=sinks, image=img, rows=rows, causal=causal, **rule)
    n = int(want["selected"].sum())
    assert 0 < n and (n < rows.sum() * hq or lq == 1), f"inputs must select some rows and leave others ({n})"
    assert torch.equal(got.selected, want["selected"])
    torch.testing.assert_close(got.out.double(), want["out"], atol=2e-5, rtol=0)
    changed = (want["out"] - reference.attention(q, k, v, scale=SCALE, causal=causal)[0]).abs().amax()
    assert changed > 1e-2  # the rule really moved the output


@pytest.mark.parametrize("path", paths())
def test_fp16_within_twice_torch_error(path):
    q, k, v, sinks, img = on_path_device(path, *var_inputs(1, 4, 2, 33, 33, 32, dtype=torch.float16))
    rows = torch.arange(33, device=q.device)[None] >= 20
    want = oracle(q, k, v, sinks=sinks, image=img, rows=rows, causal=True)
    lowp = reference.var(q, k, v, scale=SCALE, sinks=sinks, image=img, rows=rows, causal=True)["probs"].half()
    lowp_out = (lowp @ v.repeat_interleave(2, dim=1)).double()
    budget = 2 * (lowp_out - want["out"]).abs().max() + 1e-5
    got = run(path, q, k, v, sinks=sinks, image=img, rows=rows, causal=True)
    assert (got.out.double() - want["out"]).abs().max() <= budget


@pytest.mark.parametrize("path", paths())
def test_left_padding_per_row_spans_and_two_images(path, key_ranges):
    """Two sequences, left padded by 0 and 6, with the image spans at different places; the second has two images."""
    if path == "torch" and key_ranges:
        pytest.skip("key ranges are a Triton kernel option")
    b, h, lk, d = 2, 4, 48, 16
    q, k, v, sinks, img = var_inputs(b, h, h, lk, lk, d, image=(10, 26), visual_sinks=(12,), seed=3)
    img[1] = False
    img[1, 14:22] = True  # first image of sequence 1
    img[1, 30:38] = True  # second image
    sinks[1] = False
    sinks[1, [6, 15, 33]] = True  # first real token of the padded row, one visual sink per image
    pad = torch.ones(b, lk, dtype=torch.bool)
    pad[1, :6] = False
    mask = causal_mask(b, lk, lk, pad=[0, 6])
    rows = torch.zeros(b, lk, dtype=torch.bool)
    rows[0, 26:] = True
    rows[1, 22:30] = True
    rows[1, 38:] = True
    q, k, v, sinks, img, pad, mask, rows = on_path_device(path, q, k, v, sinks, img, pad, mask, rows)
    want = oracle(q, k, v, sinks=sinks, image=img, rows=rows, mask=mask)
    for m in (mask, padding_ranges(pad, lk, causal=True)) if path == "triton" else (mask,):
        got = run(path, q, k, v, sinks=sinks, image=img, rows=rows, mask=m)
        assert torch.equal(got.selected, want["selected"])
        assert want["selected"][1].any() and want["selected"][0].any()
        torch.testing.assert_close(
            got.out.double()[rows[:, None].expand(-1, h, -1)],
            want["out"][rows[:, None].expand(-1, h, -1)],
            atol=2e-5,
            rtol=0,
        )


@pytest.mark.parametrize("path", paths())
def test_keep_one_no_visual_sink_and_no_rows_are_identity(path):
    q, k, v, sinks, img = on_path_device(path, *var_inputs(1, 4, 2, 30, 30, 16))
    plain = reference.attention(q, k, v, scale=SCALE, causal=True)[0]
    rows = torch.arange(30, device=q.device)[None] >= 20
    cases = [
        dict(sinks=sinks, image=img, rows=rows, keep_fraction=1.0),
        dict(sinks=sinks & ~img, image=img, rows=rows),  # only a text sink: no visual sink, nothing selected
        dict(sinks=sinks, image=img, rows=torch.zeros_like(rows)),
    ]
    for kw in cases:
        got = run(path, q, k, v, causal=True, **kw)
        torch.testing.assert_close(got.out.double(), plain, atol=1e-5, rtol=0)
    assert not run(path, q, k, v, causal=True, **cases[1]).selected.any()


def test_rows_stay_normalised_and_mass_moves_to_image():
    q, k, v, sinks, img = var_inputs(1, 4, 2, 30, 30, 16)
    rows = torch.arange(30)[None] >= 20
    got = run("torch", q, k, v, sinks=sinks, image=img, rows=rows, causal=True, return_probs=True)
    before = reference.attention_probs(q, k, scale=SCALE, causal=True)
    sel = got.selected
    assert sel.any()
    torch.testing.assert_close(got.probs.sum(-1).double(), before.sum(-1), atol=1e-5, rtol=0)
    p_sink = (got.probs.double() * sinks[:, None, None]).sum(-1)
    torch.testing.assert_close(p_sink[sel], 0.6 * (before * sinks[:, None, None]).sum(-1)[sel], atol=1e-5, rtol=0)
    text = ~img & ~sinks
    torch.testing.assert_close(
        (got.probs.double() * text[:, None, None]).sum(-1), (before * text[:, None, None]).sum(-1), atol=1e-5, rtol=0
    )


def test_bad_arguments_are_errors():
    q, k, v, sinks, img = var_inputs(1, 2, 2, 8, 30, 16)
    with pytest.raises(ValueError, match="convention"):
        var_attention(q, k, v, scale=SCALE, sinks=sinks, image=img, convention="paperish")
    with pytest.raises(ValueError, match=r"\[B, Lk\]"):
        var_attention(q, k, v, scale=SCALE, sinks=sinks[:, :10], image=img)


@pytest.mark.skipif("triton" not in paths(), reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_folded_groups_equal_one_program_per_head(monkeypatch, splits):
    """A decode step runs each kv head's query heads as one program's rows; with folding off (one program per query
    head) the output and selection are the same, and both match the oracle; a fully padded sequence gives 0."""
    from attnpatch.kernels._triton import var as var_kernel

    monkeypatch.setattr(var_kernel, "key_splits", lambda *args: splits)
    q, k, v, sinks, img = var_inputs(3, 8, 2, 1, 60, 16, seed=7)
    pad = torch.ones(3, 60, dtype=torch.bool)
    pad[1, :5] = False
    pad[2] = False
    q, k, v, sinks, img, pad = on_triton_device(q, k, v, sinks, img, pad)
    mask = padding_ranges(pad, 1, causal=True)
    rows = torch.tensor([[True], [False], [True]], device=TRITON_DEVICE)  # sequence 1's query may not be changed
    rule = dict(keep_fraction=0.6, rho=0.8, summ=0.2, convention="paper")
    want = oracle(q, k, v, sinks=sinks, image=img, rows=rows, mask=mask, **rule)
    assert want["selected"][0].any() and not want["selected"][0].all() and not want["selected"][1].any()
    runs = []
    for fold in (True, False):
        with kernel_options(fold_decode_groups=fold):
            got = run("triton", q, k, v, sinks=sinks, image=img, rows=rows, mask=mask, **rule)
        assert torch.equal(got.selected, want["selected"])
        torch.testing.assert_close(got.out.double(), want["out"], atol=2e-5, rtol=0)
        assert got.out[2].abs().max() == 0
        runs.append(got)
    assert (runs[0].out - runs[1].out).abs().max() <= 1e-6
