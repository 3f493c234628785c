"""ACT attention (attention-sink calibration, Yu et al. ICML 2024): memory-safe PyTorch path.

Three stages per call, on blocks of query rows so that no [B, H, Lq, Lk] tensor is ever kept:
  pass A+B  logits -> per-row log-sum-exp and each key's summed probability over the valid rows (column mass);
  select    column mean over the rows that saw each key (plus the running history) -> sinks per (sequence, head);
  pass C    logits again -> P' = P * w with w = beta on sinks and c = 1 + (1 - beta) S / (1 - S) elsewhere -> P' V.
Statistics, softmax and accumulation run in float32 whatever the input dtype. GQA reads each query head's K/V
group directly (no repeated K/V). The Triton version of the same op lands with the kernels issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import block_bias_and_visibility, visible_rows

DEFAULT_BLOCK_ELEMENTS = 1 << 20  # logits elements per block (4 MiB in float32; faster than larger blocks)


@dataclass
class ColumnStats:
    """Running column statistic by absolute key position: summed probability and number of rows that saw the key."""

    colsum: torch.Tensor  # [B, H, T] float32
    count: torch.Tensor  # [B, 1|H, T] float32

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.count > 0, self.colsum / self.count.clamp_min(1.0), torch.zeros_like(self.colsum))


@dataclass
class ActOutput:
    out: torch.Tensor  # [B, Hq, Lq, D] in the input dtype
    stats: ColumnStats  # history for the next call (keys up to key_offset + Lk)
    sinks: torch.Tensor  # [B, Hq, Lk] bool: the calibrated keys of this call
    probs: torch.Tensor | None = None  # [B, Hq, Lq, Lk] calibrated probabilities, only when asked for


def _replica_groups(kv_head_index: torch.Tensor, num_kv_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split query heads into groups whose kv heads are distinct, so one batched matmul per group needs no repeat."""
    seen: dict[int, int] = {}
    rank = []
    for kv in kv_head_index.tolist():
        rank.append(seen.get(kv, 0))
        seen[kv] = rank[-1] + 1
    rank_t = torch.tensor(rank)
    groups = []
    for r in range(int(rank_t.max()) + 1 if len(rank) else 0):
        q_idx = (rank_t == r).nonzero().flatten()
        groups.append((q_idx, kv_head_index[q_idx]))
    return groups


def _take_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[:, idx] without a copy when idx is every head in order."""
    if len(idx) == x.shape[1] and bool((idx == torch.arange(x.shape[1])).all()):
        return x
    return x[:, idx.to(x.device)]


class _Blocks:
    """Row blocks of one head group with their logits (float32, -inf where hidden)."""

    def __init__(self, q, k, *, scale, softcap, mask, causal, sliding_window, block_elements):
        self.q, self.k = q, k.float()
        self.scale, self.softcap = scale, softcap
        self.mask, self.causal, self.sliding_window = mask, causal, sliding_window
        b, n, self.lq, _ = q.shape
        self.lk = k.shape[2]
        self.rows = max(1, block_elements // max(1, b * n * self.lk))

    def __iter__(self):
        for r0 in range(0, self.lq, self.rows):
            r1 = min(self.lq, r0 + self.rows)
            logits = (self.q[:, :, r0:r1].float() * self.scale) @ self.k.transpose(-1, -2)
            if self.softcap is not None:
                logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
            bias, visible = block_bias_and_visibility(
                self.mask,
                r0,
                r1,
                self.lq,
                self.lk,
                causal=self.causal,
                sliding_window=self.sliding_window,
                device=logits.device,
            )
            if bias is not None:
                logits.add_(bias)
            if visible is not None:
                logits.masked_fill_(~visible, float("-inf"))
            yield r0, r1, logits


def _probs_(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(logits - lse) computed in place over `logits`; 0 on rows that see no key."""
    return logits.sub_(lse[..., None]).exp_().nan_to_num_(nan=0.0)


def _visible_count(mask, query_valid, lq, lk, *, causal, sliding_window, block_rows, device) -> torch.Tensor:
    """[B, 1|H, Lk] number of valid query rows that see each key."""
    batch = query_valid.shape[0]
    count = None
    for r0 in range(0, lq, block_rows):
        r1 = min(lq, r0 + block_rows)
        _, visible = block_bias_and_visibility(
            mask, r0, r1, lq, lk, causal=causal, sliding_window=sliding_window, device=device
        )
        rows = query_valid[:, None, r0:r1, None].float()  # [B, 1, r, 1]
        part = (rows.expand(batch, 1, r1 - r0, lk) if visible is None else visible.float() * rows).sum(dim=2)
        count = part if count is None else count + part
    return count


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
    mask: torch.Tensor | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    kv_head_index: torch.Tensor | None = None,
    history: ColumnStats | None = None,
    key_offset: int = 0,
    return_probs: bool = False,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> ActOutput:
    """ACT-calibrated attention for q [B, Hq, Lq, D] against k, v [B, Hkv, Lk, D].

    mask: transformers' 4-D mask (bool, True = visible, or additive float) or None for the `causal` /
    `sliding_window` rules. query_valid [B, Lq]: rows that count in the statistic and get calibrated (default: rows
    that see a key). kv_head_index [Hq]: kv head of each query head (default h // (Hq / Hkv)). history / key_offset:
    running statistic from earlier calls of the same sequence (decode, chunked prefill); this call's keys sit at
    absolute positions [key_offset, key_offset + Lk).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    device = q.device
    if kv_head_index is None:
        kv_head_index = torch.arange(hq) // (hq // hkv)
    kv_head_index = kv_head_index.cpu()
    if query_valid is None:
        query_valid = visible_rows(mask, b, lq, device)
    query_valid = query_valid.to(device)
    geometry = dict(mask=mask, causal=causal, sliding_window=sliding_window)
    groups = _replica_groups(kv_head_index, hkv)

    # pass A+B: log-sum-exp per row and column mass per key
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=device)
    colsum = torch.zeros(b, hq, lk, dtype=torch.float32, device=device)
    row_weight = query_valid.float()[:, None, None, :]  # [B, 1, 1, Lq]: a row vector per sequence
    block_rows = lq
    for q_idx, kv_idx in groups:
        blocks = _Blocks(
            _take_heads(q, q_idx),
            _take_heads(k, kv_idx),
            scale=scale,
            softcap=softcap,
            block_elements=block_elements,
            **geometry,
        )
        block_rows = min(block_rows, blocks.rows)
        q_dev = q_idx.to(device)
        for r0, r1, logits in blocks:
            block_lse = torch.logsumexp(logits, dim=-1)
            lse[:, q_dev, r0:r1] = block_lse
            colsum[:, q_dev] += (row_weight[..., r0:r1] @ _probs_(logits, block_lse)).squeeze(2)
    count = _visible_count(
        mask,
        query_valid,
        lq,
        lk,
        causal=causal,
        sliding_window=sliding_window,
        block_rows=max(1, block_rows),
        device=device,
    )

    # select: running statistic over absolute key positions
    stats = _accumulate(history, colsum, count, key_offset)
    sinks = select_sinks(
        stats, threshold=threshold, min_visible_rows=min_visible_rows, keep_first_sink=keep_first_sink
    )[..., key_offset : key_offset + lk]

    # pass C: calibrated output
    out = torch.empty(b, hq, lq, d, dtype=q.dtype, device=device)
    probs_out = torch.empty(b, hq, lq, lk, dtype=torch.float32, device=device) if return_probs else None
    valid = query_valid[:, None, :]
    for q_idx, kv_idx in groups:
        q_dev = q_idx.to(device)
        sink_w = sinks[:, q_dev, None, :].float()  # [B, n, 1, Lk]
        sink_cols = torch.stack([sink_w, 1.0 - sink_w], dim=-1).squeeze(2)  # [B, n, Lk, 2]
        v_group = _take_heads(v, kv_idx).float()
        blocks = _Blocks(
            _take_heads(q, q_idx),
            _take_heads(k, kv_idx),
            scale=scale,
            softcap=softcap,
            block_elements=block_elements,
            **geometry,
        )
        for r0, r1, logits in blocks:
            p = _probs_(logits, lse[:, q_dev, r0:r1])
            s_mass, rest = (p @ sink_cols).unbind(-1)  # sink and non-sink mass per row
            active = valid[:, :, r0:r1] & (rest > 0)
            c = torch.where(active, 1.0 + (1.0 - beta) * s_mass / rest.clamp_min(1e-30), torch.ones_like(rest))
            w_sink = torch.where(active, torch.full_like(rest, beta), torch.ones_like(rest))
            p.mul_(torch.addcmul(c[..., None], (w_sink - c)[..., None], sink_w))
            out[:, q_dev, r0:r1] = (p @ v_group).to(q.dtype)
            if probs_out is not None:
                probs_out[:, q_dev, r0:r1] = p
    return ActOutput(out=out, stats=stats, sinks=sinks, probs=probs_out)


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
