"""VAR attention in one flash pass with key-class accumulators (algorithms.md section 10.3b).

One program per (query block, batch x query head). Keys carry a class (bit 0 sink, bit 1 image). Besides the online
softmax max and normaliser, each row keeps the partial normalisers of the sink, visual-sink and image non-sink keys
and three value accumulators (other, sink, image non-sink), all rescaled together. Tiles holding no sink or image key
take the plain flash step (one PV product); the others split P by class (three products). The epilogue decides per
row whether it is image-centric and combines the accumulators with non-negative weights.

With few query blocks (decode) the keys are split over programs: each writes its partial statistics and
accumulators, and a merge kernel rescales them to a common max and runs the same epilogue. A decode step with grouped
heads also runs each kv head's query heads as the rows of one program (as the flash kernel does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masking import KeyRanges
from ..options import Tiles, current_kernel_options
from .common import (
    dot_precision,
    key_loop_bounds,
    key_splits,
    key_tile,
    load_q_block,
    program_rows,
    query_block,
    range_args,
    row_ranges,
    softmax_step,
    split_length,
    strides4,
    tiles,
    upcast,
)


@triton.jit
def _class_tiles(
    acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i, q, k_base, v_base, cls_base, lo, hi, start, end, LK, D,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, scale, softcap, offs_n, offs_d,
    MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        c = tl.load(cls_base + cols * stride_cn, mask=cols < LK, other=0).to(tl.int32)
        s, v = key_tile(
            q, k_base, v_base, cols, lo, hi, offs_d, LK, D, stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap,
            MASKED, HAS_SOFTCAP, UPCAST, PRECISION, EVEN_D,
        )  # fmt: skip
        p, alpha, m_i = softmax_step(s, m_i)
        is_sink = (c & 1) != 0
        is_image = (c & 2) != 0
        p_s = tl.where(is_sink[None, :], p, 0.0)
        p_n = tl.where((is_image & ~is_sink)[None, :], p, 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        l_s = l_s * alpha + tl.sum(p_s, 1)
        l_v = l_v * alpha + tl.sum(tl.where((is_image & is_sink)[None, :], p, 0.0), 1)
        l_n = l_n * alpha + tl.sum(p_n, 1)
        acc_o = acc_o * alpha[:, None]
        acc_s = acc_s * alpha[:, None]
        acc_i = acc_i * alpha[:, None]
        if tl.max(c, 0) > 0:  # the tile holds a sink or an image key: one product per class
            p_o = p - p_s - p_n  # exact: at most one of p_s, p_n is non-zero per key
            acc_o += tl.dot(p_o.to(v.dtype), v, input_precision=PRECISION)
            acc_s += tl.dot(p_s.to(v.dtype), v, input_precision=PRECISION)
            acc_i += tl.dot(p_n.to(v.dtype), v, input_precision=PRECISION)
        else:
            acc_o += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i


@triton.jit
def _var_epilogue(
    O, SEL, ROWS, NIMG, acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, live, b, h, bh, offs_m, offs_d, m_ok, d_ok,
    stride_ob, stride_oh, stride_om, stride_od, stride_eb, stride_em, LQ, keep, rho, summ, CODE_RULE: tl.constexpr,
):  # fmt: skip
    """Which live rows are image-centric (masses here are unnormalised, i.e. times l_i); store their output, the
    three accumulators combined with non-negative weights, and the selection."""
    eligible = tl.load(ROWS + b * stride_eb + offs_m * stride_em, mask=m_ok, other=0) != 0
    image = l_v + l_n
    if CODE_RULE:
        centric = l_v <= rho * (image + tl.load(NIMG + b) * 1e-6 * l_i)
    else:
        centric = l_n >= rho * image
    chosen = live & eligible & centric & (image >= summ * l_i) & (l_n > 0)
    gain = tl.where(chosen, (1.0 - keep) * l_s / tl.where(l_n > 0, l_n, 1.0), 0.0)
    w_sink = tl.where(chosen, keep, 1.0)
    l_safe = tl.where(live, l_i, 1.0)
    out = acc_o + w_sink[:, None] * acc_s + (1.0 + gain)[:, None] * acc_i
    out = tl.where(live[:, None], out / l_safe[:, None], 0.0)
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(SEL + bh * LQ + offs_m, chosen.to(tl.int8), mask=m_ok)


@triton.jit
def _var_fwd(
    Q, K, V, O, SEL, LO, HI, KV_HEAD, CLS, ROWS, NIMG, STATS, ACCS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rb, stride_rm, stride_cb, stride_cn, stride_eb, stride_em,
    H, LQ, LK, D, SPLIT_LEN, scale, softcap, keep, rho, summ,
    CODE_RULE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(2)  # PARTIAL: this program covers keys [split * SPLIT_LEN, (split + 1) SPLIT_LEN) only
    bh, b, h, kvh, offs_m, m_ok, offs_d, d_ok, lo, hi = query_block(
        LO, HI, KV_HEAD, H, LQ, D, stride_rb, stride_rm, BLOCK_M, BLOCK_D
    )
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = m_ok & (lo < hi)
    first, left_end, full_lo, mid_end, right_start, right_end = key_loop_bounds(lo, hi, row_ok, LK, SPLIT_LEN, BLOCK_N)

    q = load_q_block(Q, b, h, offs_m, m_ok, offs_d, d_ok, stride_qb, stride_qh, stride_qm, stride_qd, UPCAST)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    cls_base = CLS + b * stride_cb
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_v = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i = _class_tiles(
        acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i, q, k_base, v_base, cls_base, lo, hi, first, left_end, LK, D,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, scale, softcap, offs_n, offs_d,
        True, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, EVEN_D,
    )  # fmt: skip
    acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i = _class_tiles(
        acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i, q, k_base, v_base, cls_base, lo, hi, full_lo, mid_end, LK, D,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, scale, softcap, offs_n, offs_d,
        False, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, EVEN_D,
    )  # fmt: skip
    acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i = _class_tiles(
        acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i, q, k_base, v_base, cls_base, lo, hi, right_start, right_end,
        LK, D, stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, scale, softcap, offs_n, offs_d,
        True, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, EVEN_D,
    )  # fmt: skip

    if PARTIAL:  # STATS [S, 5, B*H, LQ]: m, l_i, l_s, l_v, l_n; ACCS [S, 3, B*H, LQ, D]: o, s, i
        stat = STATS + (split * 5 * tl.num_programs(1) + bh) * LQ + offs_m
        plane = tl.num_programs(1) * LQ
        tl.store(stat, m_i, mask=m_ok)
        tl.store(stat + plane, l_i, mask=m_ok)
        tl.store(stat + 2 * plane, l_s, mask=m_ok)
        tl.store(stat + 3 * plane, l_v, mask=m_ok)
        tl.store(stat + 4 * plane, l_n, mask=m_ok)
        acc = ACCS + ((split * 3 * tl.num_programs(1) + bh) * LQ + offs_m[:, None]) * D + offs_d[None, :]
        ok = m_ok[:, None] & d_ok[None, :]
        tl.store(acc, acc_o, mask=ok)
        tl.store(acc + plane * D, acc_s, mask=ok)
        tl.store(acc + 2 * plane * D, acc_i, mask=ok)
    else:
        _var_epilogue(
            O, SEL, ROWS, NIMG, acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, row_ok & (l_i > 0), b, h, bh, offs_m, offs_d,
            m_ok, d_ok, stride_ob, stride_oh, stride_om, stride_od, stride_eb, stride_em, LQ, keep, rho, summ,
            CODE_RULE,
        )  # fmt: skip


@triton.jit
def _var_merge(
    STATS, ACCS, O, SEL, LO, HI, ROWS, NIMG,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rb, stride_rm, stride_eb, stride_em,
    H, LQ, D, SPLITS, keep, rho, summ,
    CODE_RULE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Combine the key splits' partial results of `_var_fwd` (PARTIAL) to a common max, then the epilogue."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    ok = m_ok[:, None] & d_ok[None, :]
    plane = tl.num_programs(1) * LQ
    m_tot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(SPLITS):
        m_s = tl.load(STATS + (split * 5 * tl.num_programs(1) + bh) * LQ + offs_m, mask=m_ok, other=float("-inf"))
        m_tot = tl.maximum(m_tot, m_s)
    m_safe = tl.where(m_tot == float("-inf"), 0.0, m_tot)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_v = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(SPLITS):
        stat = STATS + (split * 5 * tl.num_programs(1) + bh) * LQ + offs_m
        w = tl.exp2(tl.load(stat, mask=m_ok, other=float("-inf")) - m_safe)  # 0 for a split a row saw nothing of
        l_i += w * tl.load(stat + plane, mask=m_ok, other=0.0)
        l_s += w * tl.load(stat + 2 * plane, mask=m_ok, other=0.0)
        l_v += w * tl.load(stat + 3 * plane, mask=m_ok, other=0.0)
        l_n += w * tl.load(stat + 4 * plane, mask=m_ok, other=0.0)
        acc = ACCS + ((split * 3 * tl.num_programs(1) + bh) * LQ + offs_m[:, None]) * D + offs_d[None, :]
        acc_o += w[:, None] * tl.load(acc, mask=ok, other=0.0)
        acc_s += w[:, None] * tl.load(acc + plane * D, mask=ok, other=0.0)
        acc_i += w[:, None] * tl.load(acc + 2 * plane * D, mask=ok, other=0.0)
    lo, hi = row_ranges(LO, HI, b, offs_m, m_ok, stride_rb, stride_rm)
    _var_epilogue(
        O, SEL, ROWS, NIMG, acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_ok & (lo < hi) & (l_i > 0), b, h, bh, offs_m,
        offs_d, m_ok, d_ok, stride_ob, stride_oh, stride_om, stride_od, stride_eb, stride_em, LQ, keep, rho, summ,
        CODE_RULE,
    )  # fmt: skip


def var_tiles(t: Tiles, dtype: torch.dtype) -> tuple[int, int, int]:
    """(rows, keys per tile, warps) from the flash rule's tiles: three fp32 [rows, BLOCK_D] accumulators and three
    class-split probability tiles per key tile must fit without spilling (the flash rule's 64 x 64 tiles at 4 warps
    spilled at head dims 128 and 256: compile-check, sm_90); fp32 keeps the rule's 8 warps."""
    block_m = min(t.block_m, 64, max(16, 8192 // t.block_d))
    big = block_m * t.block_d > 4096
    block_n = min(t.block_n, 32) if big or t.block_d >= 256 else t.block_n
    return block_m, block_n, 8 if big or dtype == torch.float32 else 4


def var_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: KeyRanges,
    classes: torch.Tensor,
    rows: torch.Tensor,
    *,
    scale: float,
    keep_fraction: float,
    rho: float,
    summ: float,
    convention: str,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR output [B, Hq, Lq, D] (q's dtype, [B, L, H, D] memory) and the selection [B, Hq, Lq] bool.

    classes [B, Lk] int8 (bit 0 sink, bit 1 image); rows [B, Lq] bool: the rows VAR may change. num_splits: run the
    keys in this many ranges and merge (None: by occupancy when `KernelOptions.split_keys` is on, as the flash kernel
    does).
    """
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    selected = torch.empty(b, hq, lq, dtype=torch.int8, device=q.device)  # flat (b, head, row) order: folds too
    lo, hi, srb, srm = range_args(ranges)
    classes = classes.to(device=q.device, dtype=torch.int8)
    eligible = rows.to(device=q.device, dtype=torch.int8)
    seb, sem = eligible.stride()
    n_image = ((classes & 2) > 0).sum(-1).to(torch.float32)
    folded, heads, (q, out_rows) = program_rows(q, k, kv_head_index, out)
    if folded:  # rows = the query heads of one kv head; all of them see the one query's keys
        srm = sem = 0
    h, m = q.shape[1], q.shape[2]
    t = tiles(d, q.dtype, m, "var")
    block_m, block_n, warps = var_tiles(t, q.dtype)
    programs = triton.cdiv(m, block_m) * b * h
    if num_splits is None:
        num_splits = key_splits(programs, lk, block_n, q.device) if current_kernel_options().split_keys else 1
    splits, split_len = split_length(lk, block_n, num_splits)
    partial = splits > 1
    stats = torch.empty(splits, 5, b * h, m, dtype=torch.float32, device=q.device) if partial else n_image
    accs = torch.empty(splits, 3, b * h, m, d, dtype=torch.float32, device=q.device) if partial else n_image
    rule = dict(keep=float(keep_fraction), rho=float(rho), summ=float(summ))
    _var_fwd[(triton.cdiv(m, block_m), b * h, splits)](
        q, k, v, out_rows, selected, lo, hi, heads, classes, eligible, n_image, stats, accs,
        *strides4(q), *strides4(k), *strides4(v), *strides4(out_rows), srb, srm, *classes.stride(), seb, sem,
        h, m, lk, d, split_len, float(scale), float(softcap or 1.0), *rule.values(),
        CODE_RULE=convention == "code", HAS_SOFTCAP=softcap is not None, UPCAST=upcast(q.dtype),
        PRECISION=dot_precision(q.dtype), PARTIAL=partial, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=t.block_d,
        EVEN_D=t.block_d == d, num_warps=warps, num_stages=t.num_stages,
    )  # fmt: skip
    if partial:
        _var_merge[(triton.cdiv(m, block_m), b * h)](
            stats, accs, out_rows, selected, lo, hi, eligible, n_image, *strides4(out_rows), srb, srm, seb, sem,
            h, m, d, splits, *rule.values(), CODE_RULE=convention == "code", BLOCK_M=block_m, BLOCK_D=t.block_d,
            num_warps=warps,
        )  # fmt: skip
    return out, selected.bool()
