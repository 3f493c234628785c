"""Column mass: for each (batch, head, key) the summed probability over the valid query rows that see the key, and
how many such rows there are (their ratio is ACT's sink statistic). Computed from a saved per-row LSE, one tile at a
time: Triton on CUDA, the blocked PyTorch path elsewhere (as matrix products with exp(s - lse), skipping the keys
no row of a block sees: about half of them when causal); never an [Lq, Lk] tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend
from .blocks import (
    DEFAULT_BLOCK_ELEMENTS,
    LOG2E,
    default_kv_heads,
    group_blocks,
    probs_,
    replica_groups,
    visible_count,
)
from .masking import KeyRanges, ranges_visible_count


@dataclass
class ColumnStats:
    """Running column statistic by absolute key position: summed probability and number of rows that saw the key."""

    colsum: torch.Tensor  # [B, H, T] float32
    count: torch.Tensor  # [B, 1|H, T] float32

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.count > 0, self.colsum / self.count.clamp_min(1.0), torch.zeros_like(self.colsum))


def column_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | KeyRanges | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    kv_head_index: torch.Tensor | None = None,
) -> ColumnStats:
    """ColumnStats (colsum [B, Hq, Lk], count [B, 1, Lk]) of q [B, Hq, Lq, D] against k [B, Hkv, Lk, D].

    lse [B, Hq, Lq]: the rows' natural-log normaliser (from `attention(..., return_lse=True)`). mask: transformers'
    4-D mask, KeyRanges, or None for the `causal`/`sliding_window` rules. query_valid [B, Lq]: rows that count
    (default: rows that see a key). kv_head_index [Hq]: kv head of each query head (default: consecutive groups).
    """
    lk = k.shape[2]
    path, ranges, query_valid = backend.plan_rows(
        "column_mass", q, (k,), mask, query_valid, causal=causal, sliding_window=sliding_window
    )
    if path == "triton":
        from ._triton.column_mass import column_mass_forward

        colsum = column_mass_forward(
            q, k, lse, ranges, query_valid, scale=scale, softcap=softcap, kv_head_index=kv_head_index
        )
        return ColumnStats(colsum=colsum, count=ranges_visible_count(ranges, query_valid, lk))
    return _column_mass_torch(
        q, k, lse, scale=scale, mask=mask, causal=causal, sliding_window=sliding_window, softcap=softcap,
        query_valid=query_valid, kv_head_index=kv_head_index,
    )  # fmt: skip


def _column_mass_torch(
    q, k, lse, *, scale, mask, causal, sliding_window, softcap, query_valid, kv_head_index,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> ColumnStats:  # fmt: skip
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if kv_head_index is None:
        kv_head_index = default_kv_heads(hq, hkv)
    colsum = torch.zeros(b, hq, lk, dtype=torch.float32, device=q.device)
    row_weight = query_valid.float()[:, None, None, :]
    block_rows = lq
    for q_idx, kv_idx in replica_groups(kv_head_index.cpu(), hkv):
        blocks = group_blocks(
            q, k, q_idx, kv_idx, scale=scale, softcap=softcap, mask=mask, causal=causal,
            sliding_window=sliding_window, block_elements=block_elements,
        )  # fmt: skip
        block_rows = min(block_rows, blocks.rows)
        q_dev = q_idx.to(q.device)
        for r0, r1, k0, k1, logits in blocks:
            p = probs_(logits, lse[:, q_dev, r0:r1].float())
            colsum[:, q_dev, k0:k1] += (row_weight[..., r0:r1] @ p).squeeze(2)
    count = visible_count(
        mask, query_valid, lq, lk, causal=causal, sliding_window=sliding_window, block_rows=max(1, block_rows),
        device=q.device,
    )  # fmt: skip
    return ColumnStats(colsum=colsum, count=count)


def column_mass_from_logits(logits: torch.Tensor, lse: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """[B, H, Lk] column mass from base-2 logits [B, H, Lq, Lk] (-inf where unseen) and the natural LSE [B, H, Lq]:
    the sum over valid rows of exp(s - lse)."""
    p = torch.exp2(logits - (lse * LOG2E).nan_to_num(neginf=0.0)[..., None])  # rows that see nothing: all -inf
    return (p * query_valid.float()[:, None, :, None]).sum(2)
