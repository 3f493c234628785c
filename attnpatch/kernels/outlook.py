"""VOLO outlook attention (Yuan et al., TPAMI 2022), the operator inside timm's `OutlookAttention.forward`: unfold
the values into K x K windows, softmax each window's generated logits over its K*K sources, AV, fold back by summing.

One Triton pass on CUDA (no unfold tensor, no attention matrix, no atomics; fp32 softmax and accumulation) with a
Triton backward; elsewhere a PyTorch path that runs timm's unfold/fold math a batch chunk at a time in fp32 and
recomputes each chunk in the backward instead of keeping its intermediates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import backend

CHUNK_ELEMENTS = 1 << 24  # fp32 intermediates (unfolded values, probabilities, window outputs) per PyTorch chunk
MAX_TRITON_KK = 64  # K*K sources per window the Triton kernels hold in registers (K <= 8)


@dataclass(frozen=True)
class Geometry:
    kernel_size: int
    padding: int
    stride: int
    heads: int
    grid: tuple[int, int]  # (h, w) window centres


def geometry(attn_logits: torch.Tensor, v: torch.Tensor, kernel_size: int, padding: int, stride: int) -> Geometry:
    """Check the shapes of one call and return its window geometry; every bad input raises ValueError naming it."""
    for name, value, low in (("kernel_size", kernel_size, 1), ("padding", padding, 0), ("stride", stride, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"outlook attention: {name} must be an integer >= {low}, got {value!r}")
    if v.dim() != 4 or attn_logits.dim() != 4:
        raise ValueError(
            "outlook attention expects v [B, H, W, C] and attn_logits [B, h, w, heads*K^4], got shapes "
            f"{tuple(v.shape)} and {tuple(attn_logits.shape)}"
        )
    if not (v.is_floating_point() and attn_logits.is_floating_point()):
        raise ValueError(f"outlook attention needs floating-point inputs, got {v.dtype} and {attn_logits.dtype}")
    if v.device != attn_logits.device:
        raise ValueError(f"outlook attention: v is on {v.device} but attn_logits on {attn_logits.device}")
    b, h, w, c = v.shape
    k4 = kernel_size**4
    if attn_logits.shape[-1] % k4 or attn_logits.shape[-1] == 0:
        raise ValueError(
            f"outlook attention: attn_logits' last axis ({attn_logits.shape[-1]}) must be heads * K^4 = heads * {k4}"
        )
    heads = attn_logits.shape[-1] // k4
    if c % heads:
        raise ValueError(f"outlook attention: {c} channels do not split into {heads} heads")
    grid = tuple((n + 2 * padding - kernel_size) // stride + 1 for n in (h, w))
    if min(grid) < 1 or tuple(attn_logits.shape[:3]) != (b, *grid):
        raise ValueError(
            f"outlook attention: K={kernel_size}, padding={padding}, stride={stride} give a {grid[0]}x{grid[1]} grid "
            f"of windows on a {h}x{w} image (batch {b}), but attn_logits has shape {tuple(attn_logits.shape)} "
            f"(timm pools to ceil(H/stride) x ceil(W/stride) = {math.ceil(h / stride)}x{math.ceil(w / stride)}; the "
            "two agree for odd K with padding = (K - 1) / 2)"
        )
    return Geometry(kernel_size, padding, stride, heads, grid)  # type: ignore[arg-type]


def triton_unsupported(attn_logits: torch.Tensor, v: torch.Tensor, geo: Geometry, dropout_p: float) -> str | None:
    """Why the Triton kernels cannot take this call, or None."""
    if v.dtype not in backend.SUPPORTED_DTYPES:
        return f"dtype {v.dtype} (supported: float16, bfloat16, float32)"
    if attn_logits.dtype != v.dtype:
        return f"mixed dtypes ({attn_logits.dtype} logits, {v.dtype} values)"
    if geo.kernel_size**2 > MAX_TRITON_KK:
        return f"kernel_size {geo.kernel_size} (supported: up to 8)"
    if dropout_p > 0:
        return "attention dropout (training with attn_drop > 0)"
    return None


def outlook_attention(
    attn_logits: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    padding: int,
    stride: int,
    scale: float | None = None,
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """timm's outlook attention from its two linear outputs; returns [B, H, W, C] (channels-last, contiguous).

    attn_logits [B, h, w, heads*K^4]: `self.attn(self.pool(x))`, last-axis index head*K^4 + i*K^2 + j (i: output
    position in the window, j: source position). v [B, H, W, C]: `self.v(x)`. The window grid (h, w) must be the
    unfold grid ((H + 2*padding - K) // stride + 1, same for W). scale: None for head_dim ** -0.5. dropout_p: dropout
    on the attention probabilities (training only; the PyTorch path runs such calls). Output dtype: v's.
    """
    geo = geometry(attn_logits, v, kernel_size, padding, stride)
    if scale is None:
        scale = (v.shape[-1] // geo.heads) ** -0.5
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"outlook attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    reason = triton_unsupported(attn_logits, v, geo, dropout_p)
    if backend.choose("outlook_attention", v.device, reason) == "triton":
        return _OutlookTriton.apply(attn_logits, v, geo, float(scale))
    if dropout_p > 0:
        return _outlook_with_dropout(attn_logits, v, geo, float(scale), dropout_p)
    return _OutlookTorch.apply(attn_logits, v, geo, float(scale))


# ------------------------------------------------------------------------------------------------------ PyTorch path


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_math(logits: torch.Tensor, v: torch.Tensor, geo: Geometry, scale: float, dropout_p: float = 0.0):
    """timm's unfold -> softmax -> AV -> fold on a batch chunk, in fp32 (fp64 for fp64; autocast off, so AV is not
    lowered to 16 bits); returns [b, H, W, C]."""
    with torch.autocast(v.device.type, enabled=False):
        return _timm_lines(logits, v, geo, scale, dropout_p)


def _timm_lines(logits: torch.Tensor, v: torch.Tensor, geo: Geometry, scale: float, dropout_p: float):
    dtype = _compute_dtype(v.dtype)
    b, h, w, c = v.shape
    k, kk, n = geo.kernel_size, geo.kernel_size**2, geo.heads
    windows = geo.grid[0] * geo.grid[1]
    vu = F.unfold(v.to(dtype).permute(0, 3, 1, 2), k, padding=geo.padding, stride=geo.stride)
    vu = vu.reshape(b, n, c // n, kk, windows).permute(0, 1, 4, 3, 2)  # [b, n, windows, K*K, c/n]
    attn = logits.to(dtype).reshape(b, windows, n, kk, kk).permute(0, 2, 1, 3, 4)
    attn = (attn * scale).softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p, training=True)
    out = (attn @ vu).permute(0, 1, 4, 3, 2).reshape(b, c * kk, windows)
    out = F.fold(out, output_size=(h, w), kernel_size=k, padding=geo.padding, stride=geo.stride)
    return out.permute(0, 2, 3, 1)


def _chunks(v: torch.Tensor, geo: Geometry) -> list[slice]:
    """Batch slices whose fp32 intermediates stay within CHUNK_ELEMENTS."""
    b, _, _, c = v.shape
    windows = geo.grid[0] * geo.grid[1]
    per_item = windows * (2 * c * geo.kernel_size**2 + geo.heads * geo.kernel_size**4)
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    return [slice(i, min(i + step, b)) for i in range(0, b, step)]


class _OutlookTorch(torch.autograd.Function):
    """Chunked forward that keeps only its inputs; the backward recomputes each chunk with autograd."""

    @staticmethod
    def forward(ctx, logits, v, geo: Geometry, scale: float):
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        for part in _chunks(v, geo):
            out[part] = _chunk_math(logits[part], v[part], geo, scale)
        ctx.save_for_backward(logits, v)
        ctx.geo, ctx.scale = geo, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, v = ctx.saved_tensors
        need_l, need_v = ctx.needs_input_grad[:2]
        d_logits = torch.empty_like(logits) if need_l else None
        d_v = torch.empty_like(v) if need_v else None
        for part in _chunks(v, ctx.geo):
            with torch.enable_grad():
                lc = logits[part].detach().requires_grad_(need_l)
                vc = v[part].detach().requires_grad_(need_v)
                out = _chunk_math(lc, vc, ctx.geo, ctx.scale)
                inputs = [t for t in (lc, vc) if t.requires_grad]
                grads = iter(torch.autograd.grad(out, inputs, grad_out[part].to(out.dtype)))
            if need_l:
                d_logits[part] = next(grads)
            if need_v:
                d_v[part] = next(grads)
        return d_logits, d_v, None, None


def _outlook_with_dropout(logits, v, geo: Geometry, scale: float, dropout_p: float) -> torch.Tensor:
    """Training with attention dropout: chunked, plain autograd (a recomputing backward would need the same masks)."""
    parts = [_chunk_math(logits[p], v[p], geo, scale, dropout_p) for p in _chunks(v, geo)]
    return torch.cat(parts).to(v.dtype).contiguous()


# ------------------------------------------------------------------------------------------------------- Triton path


class _OutlookTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, v, geo: Geometry, scale: float):
        from ._triton.outlook import outlook_forward

        need_grad = any(ctx.needs_input_grad[:2])
        out, lse = outlook_forward(
            logits, v, kernel_size=geo.kernel_size, padding=geo.padding, stride=geo.stride, scale=scale,
            store_lse=need_grad,
        )  # fmt: skip
        if need_grad:
            ctx.save_for_backward(logits, v, lse)
        ctx.geo, ctx.scale = geo, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from ._triton.outlook import outlook_backward

        logits, v, lse = ctx.saved_tensors
        geo = ctx.geo
        d_logits, d_v = outlook_backward(
            logits, v, lse, grad_out, kernel_size=geo.kernel_size, padding=geo.padding, stride=geo.stride,
            scale=ctx.scale, need_logits=ctx.needs_input_grad[0], need_v=ctx.needs_input_grad[1],
        )  # fmt: skip
        return d_logits, d_v, None, None
