"""ACT pass C: per query row, the probability mass S and the partial output A_S over the few sink keys, then the
closed-form correction o' = beta A_S + c (o - A_S), c = (1 - beta S) / (1 - S), of the plain output o.

One program per (query block, batch x head); sink keys come as a padded index list [B, H, K] (-1 = none) and are
gathered one at a time (a handful per head), their products in fp32 FMAs: a dot of fp32 tiles has no tensor-core
form and held its operand tiles in registers, spilling 9-50 KB (compile-check, sm_90). Rows that are not valid, see
no sink, or have (1 - S) below `guard` keep o; the caller recomputes the guarded rows exactly (the subtraction
o - A_S loses precision as S approaches 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masking import KeyRanges
from .common import head_map, load_lse2, load_q_block, query_block, range_args, scaled_logits, strides4, tiles


@triton.jit
def _sink_correction(
    Q, K, V, O_IN, LSE, W, LO, HI, KV_HEAD, SINK_IDX, OUT, SINK_MASS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_im, stride_id,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rb, stride_rm, stride_wb, stride_wm,
    H, LQ, D, NUM_SINKS, scale, softcap, beta, guard,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h, kvh, rows, m_ok, offs_d, d_ok, lo, hi = query_block(
        LO, HI, KV_HEAD, H, LQ, D, stride_rb, stride_rm, BLOCK_M, BLOCK_D
    )
    w = tl.load(W + b * stride_wb + rows * stride_wm, mask=m_ok, other=0.0)
    valid = m_ok & (lo < hi) & (w > 0)
    lse = tl.where(valid, load_lse2(LSE, bh, LQ, rows, m_ok), 0.0)
    q = load_q_block(Q, b, h, rows, m_ok, offs_d, d_ok, stride_qb, stride_qh, stride_qm, stride_qd, True)
    k_base = K + b * stride_kb + kvh * stride_kh + offs_d * stride_kd
    v_base = V + b * stride_vb + kvh * stride_vh + offs_d * stride_vd
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    partial = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(NUM_SINKS):  # one sink key at a time: fp32 products without a dot's operand tiles in registers
        idx = tl.load(SINK_IDX + bh * NUM_SINKS + j)
        if idx >= 0:
            kj = tl.load(k_base + idx * stride_kn, mask=d_ok, other=0.0).to(tl.float32)
            vj = tl.load(v_base + idx * stride_vn, mask=d_ok, other=0.0).to(tl.float32)
            s = scaled_logits(tl.sum(q * kj[None, :], 1), scale, softcap, HAS_SOFTCAP)
            p = tl.where(valid & (idx >= lo) & (idx < hi), tl.exp2(s - lse), 0.0)
            mass += p
            partial += p[:, None] * vj[None, :]
    o_ptrs = offs_d[None, :] * stride_id + rows[:, None] * stride_im + b * stride_ib + h * stride_ih
    o = tl.load(O_IN + o_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    rest = 1.0 - mass
    active = valid & (mass > 0) & (rest >= guard)
    c = (1.0 - beta * mass) / tl.where(active, rest, 1.0)
    out = tl.where(active[:, None], beta * partial + c[:, None] * (o - partial), o)
    tl.store(
        OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(SINK_MASS + bh * LQ + rows, tl.where(valid, mass, 0.0), mask=m_ok)


def sink_correction_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plain_out: torch.Tensor,
    lse: torch.Tensor,
    ranges: KeyRanges,
    query_weight: torch.Tensor,
    sink_index: torch.Tensor,
    *,
    scale: float,
    beta: float,
    guard: float,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated output (q's dtype) and sink mass S [B, Hq, Lq] fp32 (0 on invalid rows).

    plain_out: the plain attention output o (fp32 recommended), lse: its natural-log LSE, sink_index [B, Hq, K] int32
    absolute key indices into k (-1 pads)."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if out is None:
        out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    mass = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    lo, hi, srb, srm = range_args(ranges)
    weight = query_weight.to(torch.float32).expand(b, lq)
    num_sinks = sink_index.shape[-1]
    sink_index = sink_index.to(torch.int32).contiguous()
    t = tiles(d, q.dtype, lq, "sink_correction")
    block_m = min(t.block_m, max(16, 4096 // t.block_d))  # fp32 q and partial tiles: 32 registers each a thread
    grid = (triton.cdiv(lq, block_m), b * hq)
    _sink_correction[grid](
        q, k, v, plain_out, lse.contiguous(), weight, lo, hi, head_map(kv_head_index, hq, hkv, q.device),
        sink_index, out, mass,
        *strides4(q), *strides4(k), *strides4(v), *strides4(plain_out), *strides4(out),
        srb, srm, weight.stride(0), weight.stride(1),
        hq, lq, d, num_sinks, float(scale), float(softcap or 1.0), float(beta), float(guard),
        HAS_SOFTCAP=softcap is not None,
        BLOCK_M=block_m, BLOCK_D=t.block_d, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out, mass
