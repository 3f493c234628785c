"""Pieces shared by the Triton kernels: the base-2 logit transform, a program's query block and key-tile bounds, one
key tile's logits and online-softmax step, tile sizes, decode folding, key splits, argument helpers."""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .. import blocks
from ..backend import interpreting
from ..blocks import default_kv_heads
from ..masking import KeyRanges
from ..options import Tiles, current_kernel_options

# The kernels work in base 2; a @triton.jit function can only read module constants that are tl.constexpr.
LOG2E = tl.constexpr(blocks.LOG2E)
LN2 = tl.constexpr(1.0 / blocks.LOG2E)


@triton.jit
def scaled_logits(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> logits in base 2 (natural logits times log2 e), with Gemma-2 style softcapping."""
    if HAS_SOFTCAP:
        # softcap * tanh(s / softcap), tanh from exp (no libdevice, so it also runs in the interpreter)
        s = s * scale
        e = tl.exp(-2.0 * tl.abs(s / softcap))
        t = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(s < 0, -t, t)
        return s * LOG2E
    return s * (scale * LOG2E)


@triton.jit
def load_lse2(LSE, bh, LQ, rows, m_ok):
    """The base-2 LSE of rows `rows` of (batch x head) `bh` from a natural-log LSE [B*H, LQ] (0 outside the rows)."""
    return tl.load(LSE + bh * LQ + rows, mask=m_ok, other=0.0) * LOG2E


@triton.jit
def row_ranges(LO, HI, b, rows, row_ok, stride_rb, stride_rm):
    """Each row's visible key interval [lo, hi); rows outside the block's range get the empty [0, 0)."""
    lo = tl.load(LO + b * stride_rb + rows * stride_rm, mask=row_ok, other=0)
    hi = tl.load(HI + b * stride_rb + rows * stride_rm, mask=row_ok, other=0)
    return lo, hi


@triton.jit
def program_heads(KV_HEAD, H):
    """(bh, b, h, kv head) of this program; grid axis 1 runs over batch x query heads."""
    bh = tl.program_id(1)
    h = bh % H
    return bh, bh // H, h, tl.load(KV_HEAD + h)


@triton.jit
def query_block(LO, HI, KV_HEAD, H, LQ, D, stride_rb, stride_rm, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query block (grid axis 0: query blocks; axis 1: batch x query heads): bh, b, h, its kv head, the
    rows and their validity, the head-dim offsets and their validity, and each row's key interval [lo, hi)."""
    bh, b, h, kvh = program_heads(KV_HEAD, H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < LQ
    lo, hi = row_ranges(LO, HI, b, offs_m, m_ok, stride_rb, stride_rm)
    return bh, b, h, kvh, offs_m, m_ok, offs_d, offs_d < D, lo, hi


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


@triton.jit
def key_loop_bounds(lo, hi, row_ok, LK, SPLIT_LEN, BLOCK_N: tl.constexpr):
    """Key-tile bounds of a query block whose rows see [lo, hi), within this program's key split (grid axis 2: split
    s covers keys [s SPLIT_LEN, (s + 1) SPLIT_LEN)).

    Returns (first, left_end, full_lo, mid_end, right_start, right_end): a masked left edge [first, left_end), an
    unmasked middle [full_lo, mid_end) that every row sees whole, and a masked right edge [right_start, right_end).
    """
    split0 = tl.program_id(2) * SPLIT_LEN
    split1 = split0 + SPLIT_LEN
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


@triton.jit
def key_tile(
    q, k_base, v_base, cols, lo, hi, offs_d, LK, D, stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap,
    MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """The base-2 logits [BLOCK_M, BLOCK_N] of the query tile against the key columns `cols` (on MASKED tiles -inf
    outside each row's [lo, hi)) and the value tile V [BLOCK_N, BLOCK_D]."""
    kt, v = load_kv_tile(
        k_base, v_base, cols, offs_d, LK, D, stride_kn, stride_kd, stride_vn, stride_vd, MASKED, UPCAST, EVEN_D
    )
    s = scaled_logits(tl.dot(q, kt, input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
    if MASKED:
        seen = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        s = tl.where(seen, s, float("-inf"))
    return s, v


@triton.jit
def softmax_step(s, m_i):
    """One online-softmax step over base-2 logits s [BLOCK_M, BLOCK_N] with running row max m_i: (p = exp2(s - new
    max), alpha = the factor that rescales what was accumulated, new max); a row that has seen no key stays at 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp2(s - m_safe[:, None]), tl.exp2(m_i - m_safe), m_new


def tiles(head_dim: int, dtype: torch.dtype, rows: int, kernel: str = "") -> Tiles:
    """Tile sizes for a flash-style kernel: larger tiles for 16-bit inputs, 16 rows for fp32, smaller at head dim
    256; the current `KernelOptions.tiles` fix them per kernel. Each configuration compiles for sm_80 and sm_90
    without spills (`attnpatch compile-check`; registers, shared memory and occupancy: benchmarks/NOTES.md)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    fixed = current_kernel_options().tiles.get(kernel)
    if fixed is not None:
        return replace(fixed, block_d=block_d)
    if interpreting():
        return Tiles(32 if rows > 16 else 16, 32, block_d, 4, 1)
    if dtype == torch.float32:
        # exact fp32 products have no tensor-core form: Triton's FMA dot holds whole rows of q and columns of K^T in
        # registers, and only 16 x 16 tiles compile without spills in every variant (64 x 64 spilled 27 KB; at head
        # dim 256 the decode variants spilled at 4 and 8 warps, the prefill ones at 4 and 16)
        return Tiles(16, 16, block_d, 16 if block_d > 128 and rows <= 16 else 8, 1)
    block_m = 16 if rows <= 16 else (64 if block_d >= 256 else 128)
    # without spills: 128 x 64 at head dim 128 spilled on sm_80 (Triton 3.6), so 32 keys where rows x head dim is
    # 128 x 128 (also 64 x 256); 16 x 32 at head dim 256 spilled on sm_90
    block_n = 32 if block_m * block_d == 128 * 128 else 16 if block_d >= 256 and block_m == 16 else 64
    warps = 8 if block_m >= 128 or block_m * block_d >= 128 * 128 else 4  # fp32 accumulator <= 64 registers a thread
    return Tiles(block_m, block_n, block_d, warps, 2 if block_d >= 256 else 3)


def decode_group(q: torch.Tensor, k: torch.Tensor, kv_head_index: torch.Tensor | None) -> int:
    """Query heads per kv head when a decode call (Lq = 1) can run them as the rows of one program (consecutive groups,
    `KernelOptions.fold_decode_groups` on), else 1. A kv_head_index on the GPU is not inspected (that would
    synchronise)."""
    hq, lq, hkv = q.shape[1], q.shape[2], k.shape[1]
    if not current_kernel_options().fold_decode_groups or lq != 1 or hq == hkv or hq % hkv:
        return 1
    if kv_head_index is not None and (
        kv_head_index.device.type != "cpu" or not torch.equal(kv_head_index.long(), default_kv_heads(hq, hkv))
    ):
        return 1
    return hq // hkv


def program_rows(
    q: torch.Tensor, k: torch.Tensor, kv_head_index: torch.Tensor | None, *per_head: torch.Tensor | None
) -> tuple[bool, torch.Tensor, tuple]:
    """How a launch maps (head, row) onto programs: (folded, head map, (q, *per_head)). Folded (`decode_group` > 1):
    q and every [B, Hq, 1, ...] tensor of `per_head` viewed as [B, Hkv, group, ...] (a kv head's query heads as the
    rows of one program; strides only, no copy; None stays None) and the identity map of the Hkv heads; otherwise
    the tensors as they are and the map of `kv_head_index`."""
    hq, hkv = q.shape[1], k.shape[1]
    group = decode_group(q, k, kv_head_index)
    if group == 1:
        return False, head_map(kv_head_index, hq, hkv, q.device), (q, *per_head)
    folded = tuple(None if t is None else t.squeeze(2).unflatten(1, (hkv, group)) for t in (q, *per_head))
    return True, head_map(None, hkv, hkv, q.device), folded


def key_splits(programs: int, lk: int, block_n: int, device: torch.device) -> int:
    """How many key ranges to run in separate programs (flash-decoding): enough to give every SM about two
    programs, each range at least 4 key tiles long; 1 off the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), lk // (4 * block_n), 64))


def split_length(lk: int, block_n: int, splits: int) -> tuple[int, int]:
    """(number of key splits, keys per split) for about `splits` splits of Lk keys, each a whole number of tiles."""
    length = triton.cdiv(triton.cdiv(lk, max(1, splits)), block_n) * block_n
    return triton.cdiv(lk, length), length


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
