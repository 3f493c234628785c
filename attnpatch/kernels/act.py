"""ACT attention (attention-sink calibration, Yu et al. ICML 2024): Triton on CUDA, a memory-safe PyTorch path
elsewhere. Neither keeps a [B, H, Lq, Lk] tensor.

  pass A   attention output o and per-row log-sum-exp;
  pass B   each key's summed probability over the valid rows (column mass) -> running column mean (plus history);
  select   keys whose column mean passes the threshold -> sinks per (sequence, head);
  pass C   per row, sink mass S and P' = P * w with w = beta on sinks and c = 1 + (1 - beta) S / (1 - S) elsewhere.
The Triton path runs A (flash kernel), B (column-mass kernel; in a decode step, the probabilities from the logits
that A writes, so K is read once) and C as a gather over the few sink keys with the closed form
o' = beta A_S + c (o - A_S); rows with S close to 1, where that subtraction loses precision, are recomputed
exactly. The PyTorch path does the same: A on PyTorch's CPU flash kernel where it takes the call (else blocks), B
as blocked matrix products that skip the keys no row of a block sees, C as the same gather and closed form. With
`return_probs` it recomputes C block by block instead.
Statistics, softmax and accumulation run in float32 whatever the input dtype. GQA reads each query head's K/V
group directly (no repeated K/V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend
from .attention import _attention_torch
from .blocks import (
    DEFAULT_BLOCK_ELEMENTS,
    attend,
    default_kv_heads,
    group_blocks,
    probs_,
    replica_groups,
    take_heads,
)
from .column_mass import ColumnStats, _column_mass_torch, column_mass_from_logits
from .masking import (
    KeyRanges,
    MaskMemo,
    columns_bias_and_visibility,
    ranges_visible_count,
    rows_bias_and_visibility,
)
from .options import current_kernel_options

# Rows whose non-sink mass 1 - S is below this are recomputed exactly (the closed form multiplies the rounding error
# of o - A_S by c = 1 + (1 - beta) S / (1 - S)). 0.1 keeps c <= 1 + 9 (1 - beta), which holds float32 outputs within
# 1e-5 of the float64 oracle on both paths. The Triton path once allowed c up to 33 (0.03): exact in the interpreter,
# but on an H200 (Triton 3.6) fp32 ACT missed the oracle rule by 1.5x (2.9e-5 against a 1.9e-5 bound), as the
# PyTorch path on CPU did at 0.03 and 0.05.
CLOSED_FORM_GUARD = 0.1


@dataclass
class ActOutput:
    out: torch.Tensor  # [B, Hq, Lq, D] in the input dtype
    stats: ColumnStats  # history for the next call (keys up to key_offset + Lk)
    sinks: torch.Tensor  # [B, Hq, Lk] bool: the calibrated keys of this call
    probs: torch.Tensor | None = None  # [B, Hq, Lq, Lk] calibrated probabilities, only when asked for


def select_sinks(stats: ColumnStats, *, threshold: float, min_visible_rows: int, keep_first_sink: bool) -> torch.Tensor:
    """[B, H, T] bool: keys whose column mean exceeds `threshold` (seen by >= `min_visible_rows` rows), minus the
    lowest-position one of each (sequence, head) when `keep_first_sink`."""
    sinks = (stats.mean > threshold) & (stats.count >= min_visible_rows)
    if keep_first_sink:
        first = sinks.to(torch.uint8).argmax(dim=-1, keepdim=True)
        sinks = sinks.scatter(-1, first, False)
    return sinks


def act_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    beta: float,
    threshold: float,
    keep_first_sink: bool = True,
    min_visible_rows: int = 1,
    mask: torch.Tensor | KeyRanges | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    kv_head_index: torch.Tensor | None = None,
    history: ColumnStats | None = None,
    key_offset: int = 0,
    return_probs: bool = False,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    mask_memo: MaskMemo | None = None,
) -> ActOutput:
    """ACT-calibrated attention for q [B, Hq, Lq, D] against k, v [B, Hkv, Lk, D].

    mask: transformers' 4-D mask (bool, True = visible, or additive float), KeyRanges, or None for the `causal` /
    `sliding_window` rules. query_valid [B, Lq]: rows that count in the statistic and get calibrated (default: rows
    that see a key). kv_head_index [Hq]: kv head of each query head (default h // (Hq / Hkv)). history / key_offset:
    running statistic from earlier calls of the same sequence (decode, chunked prefill); this call's keys sit at
    absolute positions [key_offset, key_offset + Lk). return_probs: also the calibrated [B, Hq, Lq, Lk]
    probabilities (PyTorch path only). block_elements: logits per block of the PyTorch path. mask_memo: the
    forward's masking.MaskMemo (a 4-D mask is then checked once per forward, not once per layer).
    """
    hq, hkv = q.shape[1], k.shape[1]
    if history is not None and history.colsum.shape[-1] > key_offset + k.shape[2]:
        raise ValueError(
            f"history covers {history.colsum.shape[-1]} key positions but this call's keys end at "
            f"key_offset + Lk = {key_offset + k.shape[2]}: key_offset is the absolute position of the first key of "
            "k (0 for a full KV cache), not the history length"
        )
    if kv_head_index is None:
        kv_head_index = default_kv_heads(hq, hkv)
    path, ranges, query_valid = backend.plan_rows(
        "act_attention", q, (k, v), mask, query_valid, causal=causal, sliding_window=sliding_window,
        return_probs=return_probs, mask_memo=mask_memo,
    )  # fmt: skip
    select = dict(threshold=threshold, min_visible_rows=min_visible_rows, keep_first_sink=keep_first_sink)
    if path == "triton":
        return _act_triton(
            q, k, v, ranges, scale=scale, beta=beta, softcap=softcap, query_valid=query_valid,
            kv_head_index=kv_head_index, history=history, key_offset=key_offset, select=select,
        )  # fmt: skip
    return _act_torch(
        q, k, v, scale=scale, beta=beta, mask=mask if ranges is None else ranges, causal=causal,
        sliding_window=sliding_window, softcap=softcap,
        query_valid=query_valid, kv_head_index=kv_head_index, history=history, key_offset=key_offset, select=select,
        return_probs=return_probs, block_elements=block_elements,
    )  # fmt: skip


def calibrate_(p: torch.Tensor, sinks: torch.Tensor, *, beta: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """ACT's per-row rule on probabilities p [..., R, Lk] (float32), in place: with S the sink mass of a row and 1 - S
    its non-sink mass (summed directly: 1 - S cancels when S is close to 1), P' = beta P on the sinks (sinks [..., Lk]
    bool, one set per leading index) and c P elsewhere, c = 1 + (1 - beta) S / (1 - S). Only the rows [..., R] (bool,
    broadcast; default all) that have non-sink mass change. Returns p."""
    sink_w = sinks.float()
    s_mass, rest = (p @ torch.stack([sink_w, 1.0 - sink_w], dim=-1)).unbind(-1)  # [..., R] each
    active = rest > 0 if rows is None else rows & (rest > 0)
    c = torch.where(active, 1.0 + (1.0 - beta) * s_mass / rest.clamp_min(1e-30), torch.ones_like(rest))
    w_sink = torch.where(active, torch.full_like(rest, beta), torch.ones_like(rest))
    # a select, not c + (w_sink - c) * sink: c can be huge when the sinks hold nearly all of a row's mass
    return p.mul_(torch.where(sinks[..., None, :], w_sink[..., None], c[..., None]))


def _act_torch(
    q, k, v, *, scale, beta, mask, causal, sliding_window, softcap, query_valid, kv_head_index, history, key_offset,
    select, return_probs, block_elements,
) -> ActOutput:  # fmt: skip
    lk = k.shape[2]
    geometry = dict(mask=mask, causal=causal, sliding_window=sliding_window)
    heads = dict(scale=scale, softcap=softcap, kv_head_index=kv_head_index, block_elements=block_elements)
    # pass A: output and log-sum-exp (PyTorch's flash kernel where it takes the call)
    plain, lse = _attention_torch(q, k, v, out_dtype=torch.float32, **heads, **geometry)
    # pass B: column mass as blocked products with exp(s - lse), skipping keys no row of a block sees
    mass = _column_mass_torch(q, k, lse, query_valid=query_valid, **heads, **geometry)
    stats = _accumulate(history, mass.colsum, mass.count, key_offset)
    sinks = select_sinks(stats, **select)[..., key_offset : key_offset + lk]
    # pass C: the calibrated output
    if return_probs:
        out, probs = _calibrated_blocks(q, k, v, lse, sinks, query_valid, beta=beta, **heads, **geometry)
        return ActOutput(out=out, stats=stats, sinks=sinks, probs=probs)
    out = _sink_correction_torch(q, k, v, plain, lse, sinks, query_valid, beta=beta, **heads, **geometry)
    return ActOutput(out=out, stats=stats, sinks=sinks)


def _calibrated_blocks(
    q, k, v, lse, sinks, query_valid, *, scale, beta, softcap, kv_head_index, block_elements, mask, causal,
    sliding_window,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ACT's output and its [B, Hq, Lq, Lk] probabilities, recomputed block by block (for output_attentions)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty(b, hq, lq, d, dtype=q.dtype, device=q.device)
    probs = torch.zeros(b, hq, lq, lk, dtype=torch.float32, device=q.device)
    valid = query_valid[:, None, :]
    for q_idx, kv_idx in replica_groups(kv_head_index.cpu(), hkv):
        q_dev = q_idx.to(q.device)
        group_sinks = sinks[:, q_dev]  # [B, n, Lk]
        v_group = take_heads(v, kv_idx).float()
        blocks = group_blocks(
            q, k, q_idx, kv_idx, scale=scale, softcap=softcap, mask=mask, causal=causal,
            sliding_window=sliding_window, block_elements=block_elements,
        )  # fmt: skip
        for r0, r1, k0, k1, logits in blocks:
            p = probs_(logits, lse[:, q_dev, r0:r1])
            p = calibrate_(p, group_sinks[..., k0:k1], beta=beta, rows=valid[:, :, r0:r1])
            out[:, q_dev, r0:r1] = attend(p, v_group[:, :, k0:k1]).to(q.dtype)
            probs[:, q_dev, r0:r1, k0:k1] = p
    return out, probs


def _sink_correction_torch(
    q, k, v, plain, lse, sinks, query_valid, *, scale, beta, softcap, kv_head_index, block_elements, mask, causal,
    sliding_window,
) -> torch.Tensor:  # fmt: skip
    """ACT's output from the plain one (float32) by the closed form o' = beta A_S + c (o - A_S) over the few sink
    keys, one block of rows at a time; rows whose non-sink mass is below CLOSED_FORM_GUARD are recomputed
    exactly."""
    index = sink_index(sinks)
    if index is None:
        return plain.to(q.dtype)
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    columns = index.long()
    safe = columns.clamp_min(0)
    kv_heads = kv_head_index.to(q.device)[None, :, None]
    batch = torch.arange(b, device=q.device)[:, None, None]
    k_sink, v_sink = k[batch, kv_heads, safe].float(), v[batch, kv_heads, safe].float()  # [B, Hq, K, D]
    out = plain
    guarded = torch.zeros(b, hq, lq, dtype=torch.bool, device=q.device)
    step = max(1, block_elements // max(1, b * hq * columns.shape[-1]))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        logits = (q[:, :, r0:r1].float() * scale) @ k_sink.transpose(-1, -2)  # [B, Hq, r, K]
        if softcap is not None:
            logits = logits.div_(softcap).tanh_().mul_(softcap)
        bias, visible = columns_bias_and_visibility(
            mask, columns, r0, r1, lq, lk, causal=causal, sliding_window=sliding_window
        )
        if bias is not None:
            logits.add_(bias)
        p = probs_(logits.masked_fill_(~visible, float("-inf")), lse[:, :, r0:r1])
        s_mass = p.sum(-1)  # [B, Hq, r]
        a_sink = p @ v_sink  # [B, Hq, r, D]
        valid = query_valid[:, None, r0:r1] & (s_mass > 0)
        active = valid & (s_mass < 1)
        c = torch.where(active, 1.0 + (1.0 - beta) * s_mass / (1.0 - s_mass).clamp_min(1e-30), 1.0)
        # o' = beta A_S + c (o - A_S) = c o + (beta - c) A_S, in place over the plain output
        out[:, :, r0:r1].mul_(c[..., None]).add_(a_sink.mul_(torch.where(active, beta - c, 0.0)[..., None]))
        guarded[:, :, r0:r1] = valid & (1.0 - s_mass < CLOSED_FORM_GUARD)
    if bool(guarded.any()):
        _exact_rows(
            q, k, v, out, guarded, sinks, scale=scale, beta=beta, softcap=softcap, kv_head_index=kv_head_index,
            mask=mask, causal=causal, sliding_window=sliding_window,
        )  # fmt: skip
    return out.to(q.dtype)


def _act_triton(
    q, k, v, ranges: KeyRanges, *, scale, beta, softcap, query_valid, kv_head_index, history, key_offset, select
) -> ActOutput:
    from ._triton.column_mass import column_mass_forward
    from ._triton.flash import flash_forward
    from ._triton.sink_correction import sink_correction_forward

    b, hq, lq, d = q.shape
    lk = k.shape[2]
    heads = dict(softcap=softcap, kv_head_index=kv_head_index)
    plain = torch.empty(b, hq, lq, d, dtype=torch.float32, device=q.device)
    if lq == 1 and current_kernel_options().decode_mass_from_logits:
        # one pass over K/V: the column mass of one row is its probabilities
        logits = torch.full((b, hq, 1, lk), float("-inf"), dtype=torch.float32, device=q.device)
        plain, lse = flash_forward(q, k, v, ranges, scale=scale, out=plain, logits_out=logits, **heads)
        colsum = column_mass_from_logits(logits, lse, query_valid)
    else:
        plain, lse = flash_forward(q, k, v, ranges, scale=scale, out=plain, **heads)
        colsum = column_mass_forward(q, k, lse, ranges, query_valid, scale=scale, **heads)
    stats = _accumulate(history, colsum, ranges_visible_count(ranges, query_valid, lk), key_offset)
    sinks = select_sinks(stats, **select)[..., key_offset : key_offset + lk]
    index = sink_index(sinks)
    if index is None:
        return ActOutput(out=plain.to(q.dtype), stats=stats, sinks=sinks)
    out, mass = sink_correction_forward(
        q, k, v, plain, lse, ranges, query_valid, index, scale=scale, beta=beta, guard=CLOSED_FORM_GUARD, **heads
    )
    guarded = (mass > 0) & (1.0 - mass < CLOSED_FORM_GUARD)
    if bool(guarded.any()):
        _exact_rows(q, k, v, out, guarded, sinks, scale=scale, beta=beta, mask=ranges, **heads)
    return ActOutput(out=out, stats=stats, sinks=sinks)


def sink_index(sinks: torch.Tensor) -> torch.Tensor | None:
    """[B, H, K] int32 positions of each (sequence, head)'s sinks in ascending order, -1 padded; None if no sink."""
    most = int(sinks.sum(-1).max()) if sinks.numel() else 0
    if most == 0:
        return None
    lk = sinks.shape[-1]
    positions = torch.where(sinks, torch.arange(lk, device=sinks.device), lk)
    index = positions.topk(most, dim=-1, largest=False, sorted=True).values
    return torch.where(index == lk, -1, index).to(torch.int32)


def _exact_rows(
    q, k, v, out, rows, sinks, *, scale, beta, softcap, kv_head_index, mask, causal=False, sliding_window=None,
    max_elements=1 << 22,
) -> None:  # fmt: skip
    """Recompute the ACT output of the selected (batch, head, row) triples from their full logits, in place: the
    picks of one (sequence, kv head) in row order, at most `max_elements` logits at once, each chunk only over the keys
    its rows may see (KeyRanges), K and V read in place."""
    lq, lk = q.shape[2], k.shape[2]
    kv_heads = kv_head_index.to(q.device)
    step = max(1, min(256, max_elements // max(1, lk)))
    some = rows.any(-1).nonzero()  # (sequence, head) pairs with a pick
    for b, kv in torch.stack([some[:, 0], kv_heads[some[:, 1]]], 1).unique(dim=0).tolist():
        heads = (kv_heads == kv).nonzero().flatten()
        hi, ri = rows[b, heads].nonzero().unbind(1)
        order = ri.argsort(stable=True)
        hi, ri = heads[hi[order]], ri[order]
        for start in range(0, len(ri), step):
            h, r = hi[start : start + step], ri[start : start + step]
            k0, k1 = 0, lk
            if isinstance(mask, KeyRanges):
                k0, k1 = int(mask.lo[b, r].min()), max(int(mask.hi[b, r].max()), int(mask.lo[b, r].min()))
            logits = (q[b, h, r].float() * scale) @ k[b, kv, k0:k1].float().T  # [n, k1 - k0]
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            bias, seen = rows_bias_and_visibility(
                mask, torch.full_like(r, b), h, r, lq, lk, causal=causal, sliding_window=sliding_window
            )
            if bias is not None:
                logits = logits + bias[:, k0:k1]
            if seen is not None:
                logits = logits.masked_fill(~seen[:, k0:k1], float("-inf"))
            p = calibrate_(torch.softmax(logits, dim=-1)[:, None], sinks[b, h, k0:k1], beta=beta).squeeze(1)
            out[b, h, r] = (p @ v[b, kv, k0:k1].float()).to(out.dtype)


def _accumulate(history: ColumnStats | None, colsum: torch.Tensor, count: torch.Tensor, key_offset: int) -> ColumnStats:
    """Add this call's column mass at absolute positions [key_offset, key_offset + Lk) to the running history."""
    total = key_offset + colsum.shape[-1]
    if history is None and key_offset == 0:
        return ColumnStats(colsum=colsum, count=count)
    new_sum = colsum.new_zeros(*colsum.shape[:-1], total)
    new_count = count.new_zeros(*count.shape[:-1], total)
    if history is not None:
        t = min(history.colsum.shape[-1], total)
        new_sum[..., :t] += history.colsum[..., :t]
        new_count[..., :t] += history.count[..., :t]
    new_sum[..., key_offset:] += colsum
    new_count[..., key_offset:] += count
    return ColumnStats(colsum=new_sum, count=new_count)
