"""Building blocks of the PyTorch paths: head groups for GQA without repeated K/V, and logits one block of query
rows at a time (float32, -inf where hidden), so no [B, H, Lq, Lk] tensor is ever kept."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .masking import KeyRanges, block_bias_and_visibility, ranges_visible_count, structural_ranges

DEFAULT_BLOCK_ELEMENTS = 1 << 20  # logits elements per block (4 MiB in float32; faster than larger blocks)
MAX_BLOCK_ROWS = 128  # query rows per block at most, so a causal block skips all but ~64 of the keys after its rows
LOG2E = 1.4426950408889634  # the kernels work in base 2: exp(x) = exp2(x * LOG2E)


def default_kv_heads(hq: int, hkv: int) -> torch.Tensor:
    """[Hq] kv head of each query head: consecutive groups of Hq / Hkv heads."""
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} kv heads evenly; pass kv_head_index")
    return torch.arange(hq) // (hq // hkv)


def replica_groups(kv_head_index: torch.Tensor, num_kv_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Groups of query heads that one batched product serves without repeating K/V: every head at once when each kv
    head serves a consecutive run of query heads (the usual GQA layout; LogitBlocks folds each run into the rows),
    else groups whose kv heads are distinct."""
    hq = len(kv_head_index)
    if num_kv_heads and hq % num_kv_heads == 0 and torch.equal(kv_head_index, default_kv_heads(hq, num_kv_heads)):
        return [(torch.arange(hq), torch.arange(num_kv_heads))]
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


def fold_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, r, n] -> [B, Hkv, (Hq / Hkv) r, n]: each kv head's run of query heads as more rows."""
    b, hq, r, n = x.shape
    return x.reshape(b, kv_heads, (hq // kv_heads) * r, n)


def attend(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p [B, Hq, r, k] @ v [B, Hkv, k, D] -> [B, Hq, r, D], each run of Hq / Hkv query heads on its kv head."""
    if p.shape[1] == v.shape[1]:
        return p @ v
    b, hq, r, _ = p.shape
    return (fold_heads(p, v.shape[1]) @ v).reshape(b, hq, r, v.shape[-1])


def take_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[:, idx] without a copy when idx is every head in order."""
    if len(idx) == x.shape[1] and bool((idx == torch.arange(x.shape[1])).all()):
        return x
    return x[:, idx.to(x.device)]


class LogitBlock(NamedTuple):
    """Query rows [r0, r1) against keys [k0, k1) (the keys any of these rows sees; the rest are skipped): logits
    [B, n, r1 - r0, k1 - k0], float32, -inf where hidden."""

    r0: int
    r1: int
    k0: int
    k1: int
    logits: torch.Tensor


def key_extent(visible: torch.Tensor | None, lk: int) -> tuple[int, int]:
    """[k0, k1): the smallest interval of keys holding every visible key of a block (visible [..., rows, Lk])."""
    if visible is None:
        return 0, lk
    seen = visible.reshape(-1, visible.shape[-1]).any(0).nonzero()
    if len(seen) == 0:
        return 0, 0
    return int(seen[0]), int(seen[-1]) + 1


class LogitBlocks:
    """Row blocks of one head group with their logits (float32, -inf where hidden), each only over the keys its rows
    see (a causal block skips the keys after its last row). `rows` = (start, end): only those query rows.

    Without a mask the causal/window rules become KeyRanges, and a KeyRanges block hides keys only outside the keys
    all its rows see (for causal rows, the diagonal triangle): O(rows^2) masking work instead of O(rows * Lk)."""

    def __init__(self, q, k, *, scale, softcap, mask, causal, sliding_window, block_elements, rows=None):
        self.q, self.k = q, k.float()
        self.scale, self.softcap = scale, softcap
        b, n, self.lq, _ = q.shape
        self.lk = k.shape[2]
        if mask is None and causal and self.lq > 1:
            mask = structural_ranges(b, self.lq, self.lk, causal=True, sliding_window=sliding_window, device=q.device)
        self.mask, self.causal, self.sliding_window = mask, causal, sliding_window
        self.rows = max(1, min(MAX_BLOCK_ROWS, block_elements // max(1, b * n * self.lk)))
        self.start, self.end = rows if rows is not None else (0, self.lq)

    def _logits(self, r0: int, r1: int, k0: int, k1: int) -> torch.Tensor:
        q = self.q[:, :, r0:r1].float() * self.scale
        keys = self.k[:, :, k0:k1].transpose(-1, -2)
        if q.shape[1] == keys.shape[1]:
            logits = q @ keys
        else:  # GQA: one product per kv head over its query heads' rows
            logits = (fold_heads(q, keys.shape[1]) @ keys).reshape(*q.shape[:3], k1 - k0)
        if self.softcap is not None:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _ranges_block(self, r0: int, r1: int, extent: tuple[int, int, int, int]) -> LogitBlock:
        ranges = self.mask
        k0, k1, f0, f1 = extent
        logits = self._logits(r0, r1, k0, k1)
        parts = [(k0, min(max(f0, k0), k1)), (max(f1, k0), k1)] if f0 < f1 else [(k0, k1)]
        for c0, c1 in parts:
            if c0 < c1:
                hidden = ~ranges.visibility(r0, r1, c1, first_key=c0)
                logits[..., c0 - k0 : c1 - k0].masked_fill_(hidden, float("-inf"))
        return LogitBlock(r0, r1, k0, k1, logits)

    def __iter__(self) -> Iterator[LogitBlock]:
        if isinstance(self.mask, KeyRanges):
            extents = self.mask.block_extents(self.start, self.end, self.rows)
            for i, r0 in enumerate(range(self.start, self.end, self.rows)):
                yield self._ranges_block(r0, min(self.end, r0 + self.rows), extents[i])
            return
        for r0 in range(self.start, self.end, self.rows):
            r1 = min(self.end, r0 + self.rows)
            bias, visible = block_bias_and_visibility(
                self.mask,
                r0,
                r1,
                self.lq,
                self.lk,
                causal=self.causal,
                sliding_window=self.sliding_window,
                device=self.q.device,
            )
            k0, k1 = key_extent(visible, self.lk)
            logits = self._logits(r0, r1, k0, k1)
            if bias is not None:
                logits.add_(bias[..., k0:k1])
            if visible is not None:
                logits.masked_fill_(~visible[..., k0:k1], float("-inf"))
            yield LogitBlock(r0, r1, k0, k1, logits)


def true_runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    edge = flags.new_zeros(1, dtype=torch.int8)
    steps = torch.diff(flags.to(torch.int8), prepend=edge, append=edge)
    starts, ends = (steps == 1).nonzero().flatten().tolist(), (steps == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))


def group_blocks(q, k, q_idx: torch.Tensor, kv_idx: torch.Tensor, **options) -> LogitBlocks:
    """LogitBlocks of the query heads `q_idx` against their kv heads `kv_idx` (one group of `replica_groups`)."""
    return LogitBlocks(take_heads(q, q_idx), take_heads(k, kv_idx), **options)


def probs_(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(logits - lse) computed in place over `logits`; 0 on rows that see no key."""
    return logits.sub_(lse[..., None]).exp_().nan_to_num_(nan=0.0)


def visible_count(
    mask: torch.Tensor | KeyRanges | None, query_valid, lq, lk, *, causal, sliding_window, block_rows, device
) -> torch.Tensor:
    """[B, 1|H, Lk] number of valid query rows that see each key (O(B (Lq + Lk)) without a 4-D mask)."""
    batch = query_valid.shape[0]
    if mask is None:
        mask = structural_ranges(batch, lq, lk, causal=causal, sliding_window=sliding_window, device=device)
    if isinstance(mask, KeyRanges):
        return ranges_visible_count(mask, query_valid, lk)
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
