"""ACT and VAR in every dtype, base and mask geometry, on both compute paths, against the float64 oracle.

fp32 / fp16 / bf16 x `eager` / `sdpa` x (no padding, left padding, sliding window) x (PyTorch path on the CPU,
Triton on TRITON_DEVICE: the GPU, else the interpreter); model, inputs and oracle sit on the path's device. Every
patched attention call of a tiny model with planted sinks is captured as the method hands it to the op, and the
oracle (attnpatch.kernels.reference, float64) recomputes it from the same low-precision q/k/v. The oracle does not
read the model's mask: its visibility is rebuilt from the 2-D padding mask, causality and the window, so a misread
additive mask (fp16's finfo.min is -65504) shows as other sinks. Checks: the same sink sets (ACT: keys; VAR: sink
tokens by massive activation, recomputed in float64 from the same hidden states) and outputs within the field's rule
(2x the error of the same attention done in PyTorch at the input dtype, + 1e-5).
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
import attnpatch.methods.act as act_method
import attnpatch.methods.var as var_method
from attnpatch.integrations.structure import layer_input, text_decoder_layers
from attnpatch.kernels import backend, reference

from devices import TRITON_DEVICE
from tiny_models import (
    SINK_DIMS,
    SINK_TOKEN,
    SINK_TOKEN_2,
    left_padded_batch,
    llava_prompt,
    planted_sink_model,
    tiny_llava,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ACT = dict(beta=0.4, threshold=0.1, keep_first_sink=True, min_visible_rows=1)
VAR = dict(sink_dims=list(SINK_DIMS), tau=20.0, rho=0.5, summ=0.2, keep_fraction=0.6)
S, S2 = SINK_TOKEN, SINK_TOKEN_2
TEXT = {
    "no padding": [[S, 11, 12, 13, S2, 14, 15, 16, S2, 18, 19], [S, 21, 22, S2, 23, 24, 25, S2, 26, 27, 28]],
    "left padding": [[S, 11, 12, 13, S2, 14, 15, 16, S2, 18, 19], [S, 21, 22, S2, 23, 24, 25, S2]],
    "sliding window": [[S, 11, 12, 13, S2, 14, 15, 16, S2, 18, 19, 20, S2, 30, 31], [S, 21, 22, S2, 23, 24, 25, S2]],
}
GEOMETRIES = list(TEXT)
PATHS = ["torch", "triton"]


@pytest.fixture(params=PATHS)
def device(request, monkeypatch) -> torch.device:
    """The compute path under test (ATTNPATCH_BACKEND), as the device its model, inputs and oracle run on: the CPU
    for the PyTorch path, TRITON_DEVICE (the GPU, else the CPU under the interpreter) for Triton."""
    if request.param == "triton" and (
        backend.triton_version() is None or not (torch.cuda.is_available() or backend.interpreting())
    ):
        pytest.skip("needs triton on CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv(backend.ENV_VAR, request.param)
    return TRITON_DEVICE if request.param == "triton" else torch.device("cpu")


def visibility(pad: torch.Tensor, lq: int, lk: int, *, causal: bool, window: int | None) -> torch.Tensor:
    """[B, 1, Lq, Lk] bool from first principles: real keys, not after the query, inside the window (on pad's
    device)."""
    rows = torch.arange(lk - lq, lk, device=pad.device)[:, None]
    cols = torch.arange(lk, device=pad.device)[None, :]
    visible = pad.bool()[:, None, None, :lk].expand(-1, 1, lq, lk).clone()
    if causal:
        visible &= cols <= rows
        if window is not None:
            visible &= cols > rows - window
    return visible


def dtype_error(q, k, v, visible, valid, scale) -> float:
    """Max error of plain attention computed by PyTorch at the input dtype (on q's device) against the float64
    oracle, over the valid rows. (Rows that see no key are left out with `where`, not a product: a CUDA kernel may
    leave NaN there, and NaN * 0 is NaN.)"""
    hq, hkv = q.shape[1], k.shape[1]
    low = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1), attn_mask=visible, scale=scale
    )
    exact, _ = reference.attention(q, k, v, scale=scale, mask=visible)
    return float(torch.where(valid[:, None, :, None], low.double() - exact, 0.0).abs().max())


def assert_accurate(out, exact, q, k, v, visible, valid, scale) -> None:
    """The rule of the field, for an output returned in the input dtype: its error against the float64 oracle is at
    most that of rounding the exact answer to the dtype, or 2x that of plain attention done by PyTorch in the dtype,
    plus 1e-5. (Triton's CPU interpreter converts float32 to bfloat16 by truncation, one ulp where a GPU rounds to
    nearest, half an ulp: there the rounding allowance for bf16 is one ulp of the largest output.)"""
    rows = valid[:, None, :, None]
    error = float(((out.double() - exact) * rows).abs().max())
    rounding = float(((exact.to(q.dtype).double() - exact) * rows).abs().max())
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and backend.requested() == "triton":
        largest = float((exact * rows).abs().max())
        rounding = max(rounding, 2.0 ** (torch.tensor(largest).log2().floor().item() - 7))  # bf16: 8 significant bits
    assert error <= max(rounding, 2 * dtype_error(q, k, v, visible, valid, scale)) + 1e-5


def record(monkeypatch, module, name: str) -> list:
    """Replace `module.name` by a wrapper that records (kwargs with q, k, v, result) of each call."""
    calls = []
    op = getattr(module, name)

    def recording(q, k, v, **kwargs):
        result = op(q, k, v, **kwargs)
        calls.append((q, k, v, kwargs, result))
        return result

    monkeypatch.setattr(module, name, recording)
    return calls


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_act_matches_the_float64_oracle(dtype, base, geometry, device, monkeypatch):
    model = planted_sink_model(base, "qwen2" if geometry == "sliding window" else "llama").to(DTYPES[dtype])
    model = model.to(device)
    ids, pad = (x.to(device) for x in left_padded_batch(TEXT[geometry]))
    calls = record(monkeypatch, act_method, "act_attention")
    with torch.no_grad(), attnpatch.patched(model, "act", heads="all", **ACT):
        model(ids, attention_mask=pad)
    assert len(calls) == model.config.num_hidden_layers
    windows = 0
    for q, k, v, kw, result in calls:
        lq, lk = q.shape[2], k.shape[2]
        windows += kw["sliding_window"] is not None
        visible = visibility(pad, lq, lk, causal=kw["causal"], window=kw["sliding_window"])
        valid = pad.bool()
        oracle = reference.act(q, k, v, scale=kw["scale"], mask=visible, query_valid=valid, **ACT)
        real_keys = pad.bool()[:, None, :].expand_as(result.sinks)
        assert torch.equal(result.sinks & real_keys, oracle["sinks"] & real_keys)
        assert not (result.sinks & ~real_keys).any(), "a pad key was taken for a sink"
        assert_accurate(result.out, oracle["out"], q, k, v, visible, valid, kw["scale"])
    assert any(result.sinks.any() for *_, result in calls), "no sink found: the comparison would prove nothing"
    assert (windows > 0) == (geometry == "sliding window")


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_var_matches_the_float64_oracle(dtype, base, geometry, device, monkeypatch):
    model = tiny_llava(sliding_window=12 if geometry == "sliding window" else None)
    model.set_attn_implementation(base)
    model = model.to(DTYPES[dtype]).to(device)
    text = {"no padding": ([11, 12], [20, 21]), "left padding": ([11, 12], [20, 21, 22, 23])}
    other = ([13, 14], [24, 25]) if geometry != "left padding" else ([13], [24])
    first = text.get(geometry, ([11, 12], [20, 21, 22, 23, 26, 27]))
    ids, pad = (x.to(device) for x in left_padded_batch([llava_prompt(*first), llava_prompt(*other)]))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype]).to(device)
    hidden: dict[int, torch.Tensor] = {}

    def keep_input(index: int):
        def hook(_module, args, kwargs) -> None:
            hidden.setdefault(index, layer_input(args, kwargs))

        return hook

    for index, layer in enumerate(text_decoder_layers(model)):
        layer.register_forward_pre_hook(keep_input(index), with_kwargs=True)
    calls = record(monkeypatch, var_method, "var_attention")
    with torch.no_grad(), attnpatch.patched(model, "var", **VAR) as patch:
        model(input_ids=ids, attention_mask=pad, pixel_values=pixels)
        layers = sorted(patch.method.layers())
    assert len(calls) == len(layers)
    selected = 0
    for layer, (q, k, v, kw, result) in zip(layers, calls, strict=True):
        x = hidden[layer].double()
        scores = (x[..., list(SINK_DIMS)] / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).abs().amax(-1)
        assert torch.equal(kw["sinks"], (scores > VAR["tau"]) & pad.bool())  # sink tokens, recomputed in float64
        lq, lk = q.shape[2], k.shape[2]
        visible = visibility(pad, lq, lk, causal=kw["causal"], window=kw["sliding_window"])
        oracle = reference.var(
            q, k, v, scale=kw["scale"], sinks=kw["sinks"], image=kw["image"], rows=kw["rows"], mask=visible,
            keep_fraction=VAR["keep_fraction"], rho=VAR["rho"], summ=VAR["summ"], convention="paper",
        )  # fmt: skip
        assert torch.equal(result.selected, oracle["selected"])
        selected += int(result.selected.sum())
        assert_accurate(result.out, oracle["out"], q, k, v, visible, pad.bool(), kw["scale"])
    assert selected > 0, "no row was redistributed: the comparison would prove nothing"
