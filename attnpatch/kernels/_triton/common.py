"""Pieces shared by the Triton kernels: logit transform, tile sizes, argument helpers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ..blocks import default_kv_heads
from ..masking import KeyRanges


@triton.jit
def scaled_logits(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> logits in base 2 (natural logits times log2 e), with Gemma-2 style softcapping."""
    if HAS_SOFTCAP:
        # softcap * tanh(s / softcap), tanh from exp (no libdevice, so it also runs in the interpreter)
        s = s * scale
        e = tl.exp(-2.0 * tl.abs(s / softcap))
        t = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(s < 0, -t, t)
        return s * 1.4426950408889634
    return s * (scale * 1.4426950408889634)


@triton.jit
def row_ranges(LO, HI, b, rows, row_ok, stride_rb, stride_rm):
    """Each row's visible key interval [lo, hi); rows outside the block's range get the empty [0, 0)."""
    lo = tl.load(LO + b * stride_rb + rows * stride_rm, mask=row_ok, other=0)
    hi = tl.load(HI + b * stride_rb + rows * stride_rm, mask=row_ok, other=0)
    return lo, hi


@triton.jit
def load_q_block(Q, b, h, offs_m, m_ok, offs_d, d_ok, stride_qb, stride_qh, stride_qm, stride_qd,
                 UPCAST: tl.constexpr):  # fmt: skip
    """The [BLOCK_M, BLOCK_D] query tile of (b, h) at rows `offs_m` (0 outside the rows/dims), fp32 when UPCAST."""
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return q


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# Fixed tiles per kernel ("flash", "column_mass", "sink_correction", "var") while sweeping them on a GPU
# (benchmarks/tune_tiles.py); kernels not named here use the rule in `tiles`.
TILE_OVERRIDES: dict[str, Tiles] = {}


def tiles(head_dim: int, dtype: torch.dtype, rows: int, kernel: str = "") -> Tiles:
    """Tile sizes for a flash-style kernel: larger tiles for 16-bit inputs, smaller for fp32 and head dim 256."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if kernel in TILE_OVERRIDES:
        return replace(TILE_OVERRIDES[kernel], block_d=block_d)
    if interpreting():
        return Tiles(32 if rows > 16 else 16, 32, block_d, 4, 1)
    block_m = 16 if rows <= 16 else (64 if block_d >= 256 or dtype == torch.float32 else 128)
    block_n = 32 if block_d >= 256 and dtype == torch.float32 else 64
    warps = 4 if block_m <= 64 else 8
    return Tiles(block_m, block_n, block_d, warps, 2 if block_d >= 256 else 3)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32 rounding); 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """Convert tiles to fp32 after loading: always in the interpreter (its bf16 math is wrong), and for fp32."""
    return interpreting() or dtype == torch.float32


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def range_args(ranges: KeyRanges) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """lo, hi (int32) and their (batch, row) strides."""
    lo, hi = ranges.lo.to(torch.int32), ranges.hi.to(torch.int32)
    if lo.stride() != hi.stride():
        lo, hi = lo.contiguous(), hi.contiguous()
    return lo, hi, lo.stride(0), lo.stride(1)


def head_map(kv_head_index: torch.Tensor | None, hq: int, hkv: int, device: torch.device) -> torch.Tensor:
    """[Hq] int32 kv head of each query head (default: consecutive groups of Hq / Hkv heads)."""
    if kv_head_index is None:
        kv_head_index = default_kv_heads(hq, hkv)
    return kv_head_index.to(device=device, dtype=torch.int32)


@triton.jit
def key_loop_bounds(lo, hi, row_ok, LK, split0, split1, BLOCK_N: tl.constexpr):
    """Key-tile bounds of a query block whose rows see [lo, hi), within the split [split0, split1).

    Returns (first, left_end, full_lo, mid_end, right_start, right_end): a masked left edge [first, left_end), an
    unmasked middle [full_lo, mid_end) that every row sees whole, and a masked right edge [right_start, right_end).
    """
    lo_min = tl.min(tl.where(row_ok, lo, LK), 0)
    lo_max = tl.max(tl.where(row_ok, lo, 0), 0)
    hi_min = tl.min(tl.where(row_ok, hi, LK), 0)
    hi_max = tl.max(tl.where(row_ok, hi, 0), 0)
    first = (lo_min // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(lo_max, BLOCK_N) * BLOCK_N
    full_hi = (hi_min // BLOCK_N) * BLOCK_N
    has_mid = full_hi > full_lo
    left_end = tl.minimum(tl.where(has_mid, full_lo, hi_max), split1)
    mid_end = tl.minimum(tl.where(has_mid, full_hi, full_lo), split1)
    right_start = tl.maximum(tl.where(has_mid, full_hi, hi_max), split0)
    right_end = tl.minimum(hi_max, split1)
    first = tl.maximum(first, split0)
    full_lo = tl.maximum(full_lo, split0)
    return first, left_end, full_lo, mid_end, right_start, right_end


@triton.jit
def load_kv_tile(
    k_base, v_base, cols, offs_d, LK, D, stride_kn, stride_kd, stride_vn, stride_vd,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] of the key columns `cols`; MASKED tiles may run past Lk."""
    d_ok = offs_d < D
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        c_ok = cols < LK
        kt = tl.load(k_ptrs, mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:  # middle tiles lie inside every row's interval, so inside Lk
        kt = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    return kt, v
