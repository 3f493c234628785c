"""Flash-attention forward with per-row log-sum-exp (online softmax, fp32 accumulation).

One program per (query block, batch x query head). The kv head of each query head is read from a table (GQA without
repeating K/V). Each row sees the keys of its interval [lo, hi); the key loop runs over the union of the block's
intervals in three parts: a masked left edge, an unmasked middle that every row sees whole, a masked right edge.

Decode (Lq = 1) with grouped heads folds the query heads of each kv head into the rows of one program, so every
K/V tile is read once per kv head rather than once per query head (strides only: no copy). The kernel can also
write each row's base-2 logits, for ACT's column mass without a second pass over K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masking import KeyRanges
from .common import (
    LN2,
    dot_precision,
    key_loop_bounds,
    key_splits,
    key_tile,
    load_q_block,
    program_rows,
    query_block,
    range_args,
    softmax_step,
    split_length,
    strides4,
    tiles,
    upcast,
)


@triton.jit
def _key_tiles(
    acc, l_i, m_i, q, k_base, v_base, s_rows, lo, hi, start, end, LK, D,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, scale, softcap,
    offs_n, offs_d, row_ok,
    MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, STORE_LOGITS: tl.constexpr,
):  # fmt: skip
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        s, v = key_tile(
            q, k_base, v_base, cols, lo, hi, offs_d, LK, D, stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap,
            MASKED, HAS_SOFTCAP, UPCAST, PRECISION, EVEN_D,
        )  # fmt: skip
        if STORE_LOGITS:  # s_rows: pointers to column 0 of each row's logits
            tl.store(s_rows[:, None] + cols[None, :] * stride_sn, s, mask=row_ok[:, None] & (cols < LK)[None, :])
        p, alpha, m_i = softmax_step(s, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _flash_fwd(
    Q, K, V, O, LSE, LO, HI, KV_HEAD, S,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_sb, stride_sh, stride_sm, stride_sn,
    stride_rb, stride_rm,
    stride_os, H, LQ, LK, D, SPLIT_LEN, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, STORE_LSE: tl.constexpr, STORE_LOGITS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(2)  # split-KV (decode): this program covers keys [split * SPLIT_LEN, (split + 1) SPLIT_LEN)
    bh, b, h, kvh, offs_m, m_ok, offs_d, d_ok, lo, hi = query_block(
        LO, HI, KV_HEAD, H, LQ, D, stride_rb, stride_rm, BLOCK_M, BLOCK_D
    )
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = m_ok & (lo < hi)
    first, left_end, full_lo, mid_end, right_start, right_end = key_loop_bounds(lo, hi, row_ok, LK, SPLIT_LEN, BLOCK_N)

    q = load_q_block(Q, b, h, offs_m, m_ok, offs_d, d_ok, stride_qb, stride_qh, stride_qm, stride_qd, UPCAST)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    s_rows = S + b * stride_sb + h * stride_sh + offs_m * stride_sm
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _key_tiles(
        acc, l_i, m_i, q, k_base, v_base, s_rows, lo, hi, first, left_end, LK, D,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, scale, softcap, offs_n, offs_d, row_ok,
        True, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, EVEN_D, STORE_LOGITS,
    )  # fmt: skip
    acc, l_i, m_i = _key_tiles(
        acc, l_i, m_i, q, k_base, v_base, s_rows, lo, hi, full_lo, mid_end, LK, D,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, scale, softcap, offs_n, offs_d, row_ok,
        False, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, EVEN_D, STORE_LOGITS,
    )  # fmt: skip
    acc, l_i, m_i = _key_tiles(
        acc, l_i, m_i, q, k_base, v_base, s_rows, lo, hi, right_start, right_end, LK, D,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, scale, softcap, offs_n, offs_d, row_ok,
        True, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, EVEN_D, STORE_LOGITS,
    )  # fmt: skip

    live = row_ok & (l_i > 0)
    l_safe = tl.where(live, l_i, 1.0)
    out = tl.where(live[:, None], acc / l_safe[:, None], 0.0)
    tl.store(
        O
        + split * stride_os
        + b * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    if STORE_LSE:
        lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
        tl.store(LSE + (split * tl.num_programs(1) + bh) * LQ + offs_m, lse, mask=m_ok)


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: KeyRanges,
    *,
    scale: float,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = True,
    num_splits: int | None = None,
    logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q [B, Hq, Lq, D] over k, v [B, Hkv, Lk, D]; returns out (q's dtype unless `out` is given, e.g. an
    fp32 buffer) and the natural-log LSE [B, Hq, Lq] fp32 (-inf on rows that see no key).

    num_splits: split the keys into this many ranges run by separate programs and merge their partial results by
    LSE (flash-decoding); None chooses by occupancy (it only pays when there are few query blocks and many keys).
    logits_out: a float32 [B, Hq, Lq, Lk] buffer that receives each row's base-2 logits (natural logits times
    log2 e) on the keys it sees; the caller fills it with -inf first (keys no row of a query block sees are not
    written).
    """
    b, hq, lq, d = q.shape
    if out is None:
        out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, L, H, D] memory
    lo, hi, srb, srm = range_args(ranges)
    folded, heads, (q, out_rows, logits_rows) = program_rows(q, k, kv_head_index, out, logits_out)
    if folded:  # rows = the query heads of one kv head; all of them see the one query's key range
        srm = 0
    lse = _launch(q, k, v, out_rows, logits_rows, lo, hi, srb, srm, heads, scale, softcap, return_lse, num_splits)
    return out, (lse.view(b, hq, lq) if return_lse else None)


def _launch(q, k, v, out, logits, lo, hi, srb, srm, heads, scale, softcap, return_lse, num_splits) -> torch.Tensor:
    """Run the kernel on q [B, H, M, D] (H, M: the program's heads and rows); returns the LSE [B, H, M]."""
    b, h, m, d = q.shape
    lk = k.shape[2]
    t = tiles(d, q.dtype, m, "flash")
    programs = triton.cdiv(m, t.block_m) * b * h
    wanted = key_splits(programs, lk, t.block_n, q.device) if num_splits is None else num_splits
    splits, split_len = split_length(lk, t.block_n, wanted)
    if splits == 1:
        target, lse = out, torch.empty(b, h, m, dtype=torch.float32, device=q.device)
    else:
        target = torch.empty(splits, b, h, m, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, b, h, m, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(m, t.block_m), b * h, splits)
    _flash_fwd[grid](
        q, k, v, target, lse, lo, hi, heads, lse if logits is None else logits,
        *strides4(q), *strides4(k), *strides4(v), *target.stride()[-4:],
        *((0, 0, 0, 0) if logits is None else strides4(logits)), srb, srm,
        target.stride(0) if splits > 1 else 0, h, m, lk, d, split_len, float(scale), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, STORE_LSE=return_lse or splits > 1, STORE_LOGITS=logits is not None,
        UPCAST=upcast(q.dtype), PRECISION=dot_precision(q.dtype), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_D=t.block_d, EVEN_D=t.block_d == d, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return _merge_splits(target, lse, out) if splits > 1 else lse


def _merge_splits(parts: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Combine per-split outputs [S, B, H, Lq, D] and LSEs [S, B, H, Lq] into `out`; returns the total LSE."""
    lse = torch.logsumexp(part_lse, dim=0)
    weight = torch.exp(part_lse - lse.masked_fill(torch.isinf(lse), 0.0)).nan_to_num_(nan=0.0)
    out.copy_((parts * weight[..., None]).sum(0))
    return lse
