"""Building blocks of the PyTorch paths: head groups for GQA without repeated K/V, and logits one block of query
rows at a time (float32, -inf where hidden), so no [B, H, Lq, Lk] tensor is ever kept."""

from __future__ import annotations

import torch

from .masking import KeyRanges, block_bias_and_visibility

DEFAULT_BLOCK_ELEMENTS = 1 << 20  # logits elements per block (4 MiB in float32; faster than larger blocks)
LOG2E = 1.4426950408889634  # the kernels work in base 2: exp(x) = exp2(x * LOG2E)


def default_kv_heads(hq: int, hkv: int) -> torch.Tensor:
    """[Hq] kv head of each query head: consecutive groups of Hq / Hkv heads."""
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} kv heads evenly; pass kv_head_index")
    return torch.arange(hq) // (hq // hkv)


def replica_groups(kv_head_index: torch.Tensor, num_kv_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def take_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[:, idx] without a copy when idx is every head in order."""
    if len(idx) == x.shape[1] and bool((idx == torch.arange(x.shape[1])).all()):
        return x
    return x[:, idx.to(x.device)]


class LogitBlocks:
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


def group_blocks(q, k, q_idx: torch.Tensor, kv_idx: torch.Tensor, **options) -> LogitBlocks:
    """LogitBlocks of the query heads `q_idx` against their kv heads `kv_idx` (one group of `replica_groups`)."""
    return LogitBlocks(take_heads(q, q_idx), take_heads(k, kv_idx), **options)


def probs_(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(logits - lse) computed in place over `logits`; 0 on rows that see no key."""
    return logits.sub_(lse[..., None]).exp_().nan_to_num_(nan=0.0)


def visible_count(
    mask: torch.Tensor | KeyRanges | None, query_valid, lq, lk, *, causal, sliding_window, block_rows, device
) -> torch.Tensor:
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
