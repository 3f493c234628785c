"""Attention probabilities recomputed from one call's q and k, one block of query rows at a time, and the token
geometry (image patch grid or text positions) the distance and pattern analyses measure them on.

Nothing of size [Lq, Lk] outlives a block: each analysis reduces the block it is handed and drops it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..api import patched, runs_unpatched
from ..kernels.blocks import DEFAULT_BLOCK_ELEMENTS, LogitBlocks, default_kv_heads, probs_, replica_groups, take_heads
from ..kernels.masking import query_rows
from ..methods.base import AttentionCall


@dataclass
class ProbBlock:
    """Rows [r0, r1) of query heads `heads` of one call: probabilities [B, h, r, Lk] (float32, 0 where hidden) and
    the visibility [B, 1|h, r, Lk] of each key."""

    r0: int
    r1: int
    heads: torch.Tensor
    probs: torch.Tensor
    visible: torch.Tensor


def probability_blocks(call: AttentionCall, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Iterator[ProbBlock]:
    """The call's softmax probabilities with its own mask, causal, window and softcap rules, block by block
    (GQA head groups without repeating K)."""
    q, k = call.query, call.key
    hq, hkv = q.shape[1], k.shape[1]
    for q_idx, kv_idx in replica_groups(default_kv_heads(hq, hkv), hkv):
        blocks = LogitBlocks(
            take_heads(q, q_idx), take_heads(k, kv_idx), scale=call.scale, softcap=call.softcap, mask=call.mask,
            causal=call.causal, sliding_window=call.sliding_window, block_elements=block_elements,
        )  # fmt: skip
        for r0, r1, k0, k1, logits in blocks:
            logits = torch.nn.functional.pad(logits, (k0, blocks.lk - k1), value=float("-inf"))
            visible = torch.isfinite(logits)
            lse = torch.logsumexp(logits, dim=-1)
            yield ProbBlock(r0, r1, q_idx, probs_(logits, lse), visible)


@dataclass(frozen=True)
class Geometry:
    """Where the tokens of a forward pass sit.

    kind "image": tokens [0, prefix) are CLS / distillation / register tokens, the rest a row-major patch grid
    `grid` = (rows, cols); distances are in patches ("euclid", "chebyshev" or "manhattan"). kind "text": token
    distance |i - j| between real-token positions (padding skipped); the first `prefix` real tokens (BOS, usually
    the main sink) are reported apart. Excluded ("special") keys never enter distance bins or patterns.
    """

    kind: str
    prefix: int = 1
    grid: tuple[int, int] | None = None
    metric: str = "euclid"

    def __post_init__(self) -> None:
        if self.kind not in ("image", "text"):
            raise ValueError(f"kind must be 'image' or 'text', got {self.kind!r}")
        if self.metric not in ("euclid", "chebyshev", "manhattan"):
            raise ValueError(f"metric must be 'euclid', 'chebyshev' or 'manhattan', got {self.metric!r}")
        if isinstance(self.prefix, bool) or not isinstance(self.prefix, int) or self.prefix < 0:
            raise ValueError(f"prefix must be an integer >= 0, got {self.prefix!r}")

    def grid_for(self, tokens: int) -> tuple[int, int]:
        """The patch grid of a sequence of `tokens` tokens (square unless `grid` is given)."""
        patches = tokens - self.prefix
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != patches:
                raise ValueError(f"grid {self.grid} has {self.grid[0] * self.grid[1]} patches, the input {patches}")
            return self.grid
        side = math.isqrt(max(patches, 0))
        if patches <= 0 or side * side != patches:
            raise ValueError(
                f"{tokens} tokens minus {self.prefix} prefix tokens is not a square patch grid; pass grid=(rows, cols)"
            )
        return side, side

    def coordinates(self, tokens: int, device: torch.device) -> torch.Tensor:
        """[tokens - prefix, 2] (row, col) of each patch token."""
        rows, cols = self.grid_for(tokens)
        index = torch.arange(rows * cols, device=device)
        return torch.stack([index // cols, index % cols], dim=-1)

    def max_distance(self, tokens: int) -> float:
        rows, cols = self.grid_for(tokens)
        dr, dc = rows - 1, cols - 1
        return {"euclid": math.hypot(dr, dc), "chebyshev": max(dr, dc), "manhattan": dr + dc}[self.metric]

    def patch_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances between (row, col) coordinates a [..., 2] and b [..., 2] (broadcast)."""
        diff = (a - b).abs().float()
        if self.metric == "euclid":
            return diff.pow(2).sum(-1).sqrt()
        return diff.amax(-1) if self.metric == "chebyshev" else diff.sum(-1)


@dataclass
class TokenLayout:
    """One call's tokens under a Geometry: per batch row, each token's position (text: real-token index; image:
    patch index) [B, L], which tokens are real [B, L], which are special [B, L], and the patch (row, col) [L, 2]
    for images."""

    positions: torch.Tensor
    real: torch.Tensor
    special: torch.Tensor
    coords: torch.Tensor | None


def layout(call: AttentionCall, geometry: Geometry) -> TokenLayout:
    """Token layout of a call that has all of its keys (no KV cache: Lq == Lk)."""
    b, _, lq, _ = call.query.shape
    lk = call.key.shape[2]
    if call.past_length or lq != lk:
        raise ValueError(
            "attnpatch analysis needs whole-sequence forwards (no KV cache, queries == keys); "
            f"got {lq} queries over {lk} keys with {call.past_length} cached"
        )
    device = call.query.device
    real = query_rows(call.query_valid, call.mask, b, lq, device)
    if geometry.kind == "image":
        coords = geometry.coordinates(lk, device)
        positions = (torch.arange(lk, device=device) - geometry.prefix).expand(b, lk)
        special = (torch.arange(lk, device=device) < geometry.prefix).expand(b, lk)
        return TokenLayout(positions, real, special, coords)
    positions = real.long().cumsum(-1) - 1
    special = real & (positions < geometry.prefix)
    return TokenLayout(positions, real, special, None)


@runs_unpatched
def observe_forward(
    model: nn.Module, observe: Callable[[AttentionCall], Any], inputs: dict[str, Any], **call_kwargs: Any
) -> Any:
    """One no-grad forward of `model` on `inputs` with a head_mask patch (no gates) that hands every attention call
    to `observe`; outputs are the plain model's."""
    if model.training:
        raise RuntimeError("attnpatch analysis runs in inference mode: call model.eval() first (dropout is active)")
    with torch.no_grad(), patched(model, "head_mask", observe=observe):
        return model(**inputs, **call_kwargs)
