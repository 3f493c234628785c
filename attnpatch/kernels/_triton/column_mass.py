"""Column mass: for each (batch, head, key) the summed probability over the valid query rows, from a saved LSE.

Each program owns one key block of one (batch, head) and loops over the query blocks, recomputing q.k and
exp(s - LSE) tile by tile (the dK/dV loop of a flash backward): no atomics and no [Lq, Lk] tensor. Query tiles in
which no row sees the key block are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masking import KeyRanges
from .common import (
    dot_precision,
    head_map,
    load_lse2,
    load_q_block,
    program_heads,
    range_args,
    row_ranges,
    scaled_logits,
    strides4,
    tiles,
    upcast,
)


@triton.jit
def _column_mass(
    Q, K, LSE, W, LO, HI, KV_HEAD, COLSUM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_rb, stride_rm, stride_wb, stride_wm,
    H, LQ, LK, D, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h, kvh = program_heads(KV_HEAD, H)
    n_start = tl.program_id(0) * BLOCK_N
    cols = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = cols < LK
    d_ok = offs_d < D
    kt = tl.load(
        K + b * stride_kb + kvh * stride_kh + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=c_ok[None, :] & d_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        kt = kt.to(tl.float32)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, LQ, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        m_ok = rows < LQ
        lo, hi = row_ranges(LO, HI, b, rows, m_ok, stride_rb, stride_rm)
        w = tl.load(W + b * stride_wb + rows * stride_wm, mask=m_ok, other=0.0)
        sees = (lo < n_start + BLOCK_N) & (hi > n_start) & (lo < hi) & (w > 0)
        if tl.max(sees.to(tl.int32), 0) > 0:
            q = load_q_block(Q, b, h, rows, m_ok, offs_d, d_ok, stride_qb, stride_qh, stride_qm, stride_qd, UPCAST)
            lse = load_lse2(LSE, bh, LQ, rows, m_ok)
            s = scaled_logits(tl.dot(q, kt, input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
            seen = sees[:, None] & (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
            p = tl.where(seen, tl.exp2(s - tl.where(sees, lse, 0.0)[:, None]), 0.0)
            colsum += tl.sum(p * w[:, None], 0)
    tl.store(COLSUM + bh * LK + cols, colsum, mask=c_ok)


def column_mass_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    ranges: KeyRanges,
    query_weight: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Hq, Lk] fp32: sum over rows i of query_weight[b, i] * P[b, h, i, j], with P = exp(s - lse) on seen keys."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    colsum = torch.empty(b, hq, lk, dtype=torch.float32, device=q.device)
    lo, hi, srb, srm = range_args(ranges)
    weight = query_weight.to(torch.float32).expand(b, lq)
    lse = lse.to(torch.float32).contiguous()
    t = tiles(d, q.dtype, lq, "column_mass")
    grid = (triton.cdiv(lk, t.block_n), b * hq)
    _column_mass[grid](
        q, k, lse, weight, lo, hi, head_map(kv_head_index, hq, hkv, q.device), colsum,
        *strides4(q), *strides4(k), srb, srm, weight.stride(0), weight.stride(1),
        hq, lq, lk, d, float(scale), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, UPCAST=upcast(q.dtype), PRECISION=dot_precision(q.dtype),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return colsum
