"""VAR attention in one flash pass with key-class accumulators (algorithms.md section 10.3b).

One program per (query block, batch x query head). Keys carry a class (bit 0 sink, bit 1 image). Besides the online
softmax max and normaliser, each row keeps the partial normalisers of the sink, visual-sink and image non-sink keys
and three value accumulators (other, sink, image non-sink), all rescaled together. Tiles holding no sink or image key
take the plain flash step (one PV product); the others split P by class (three products). The epilogue decides per
row whether it is image-centric and combines the accumulators with non-negative weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masking import KeyRanges
from .common import (
    dot_precision,
    head_map,
    key_loop_bounds,
    load_kv_tile,
    load_q_block,
    range_args,
    row_ranges,
    scaled_logits,
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
        kt, v = load_kv_tile(
            k_base, v_base, cols, offs_d, LK, D, stride_kn, stride_kd, stride_vn, stride_vd, MASKED, UPCAST, EVEN_D
        )
        c = tl.load(cls_base + cols * stride_cn, mask=cols < LK, other=0).to(tl.int32)
        s = scaled_logits(tl.dot(q, kt, input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
        if MASKED:
            seen = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
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
        m_i = m_new
    return acc_o, acc_s, acc_i, l_i, l_s, l_v, l_n, m_i


@triton.jit
def _var_fwd(
    Q, K, V, O, SEL, LO, HI, KV_HEAD, CLS, ROWS, NIMG,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rb, stride_rm, stride_cb, stride_cn, stride_eb, stride_em,
    H, LQ, LK, D, scale, softcap, keep, rho, summ,
    CODE_RULE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = tl.load(KV_HEAD + h)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < LQ
    d_ok = offs_d < D

    lo, hi = row_ranges(LO, HI, b, offs_m, m_ok, stride_rb, stride_rm)
    row_ok = m_ok & (lo < hi)
    first, left_end, full_lo, mid_end, right_start, right_end = key_loop_bounds(lo, hi, row_ok, LK, 0, LK, BLOCK_N)

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

    # epilogue: image-centric rows (masses here are unnormalised, i.e. times l_i)
    live = row_ok & (l_i > 0)
    eligible = tl.load(ROWS + b * stride_eb + offs_m * stride_em, mask=m_ok, other=0) != 0
    image = l_v + l_n
    if CODE_RULE:
        n_image = tl.load(NIMG + b)
        centric = l_v <= rho * (image + n_image * 1e-6 * l_i)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR output [B, Hq, Lq, D] (q's dtype, [B, L, H, D] memory) and the selection [B, Hq, Lq] bool.

    classes [B, Lk] int8 (bit 0 sink, bit 1 image); rows [B, Lq] bool: the rows VAR may change.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    selected = torch.empty(b, hq, lq, dtype=torch.int8, device=q.device)
    lo, hi, srb, srm = range_args(ranges)
    classes = classes.to(device=q.device, dtype=torch.int8)
    eligible = rows.to(device=q.device, dtype=torch.int8)
    n_image = ((classes & 2) > 0).sum(-1).to(torch.float32)
    t = tiles(d, q.dtype, lq, "var")
    block_m = min(t.block_m, 64)  # three accumulators per row
    grid = (triton.cdiv(lq, block_m), b * hq)
    _var_fwd[grid](
        q, k, v, out, selected, lo, hi, head_map(kv_head_index, hq, hkv, q.device), classes, eligible, n_image,
        *strides4(q), *strides4(k), *strides4(v), *strides4(out), srb, srm, *classes.stride(), *eligible.stride(),
        hq, lq, lk, d, float(scale), float(softcap or 1.0), float(keep_fraction), float(rho), float(summ),
        CODE_RULE=convention == "code", HAS_SOFTCAP=softcap is not None, UPCAST=upcast(q.dtype),
        PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        EVEN_D=t.block_d == d, num_warps=4, num_stages=t.num_stages,
    )  # fmt: skip
    return out, selected.bool()
