"""Visibility of keys to queries, one block of query rows at a time (never the full [Lq, Lk] unless given)."""

from __future__ import annotations

import torch

# Additive float masks mark hidden keys with a very negative number (transformers uses finfo(dtype).min).
_HIDDEN_BELOW = -1e30


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean visibility of a bool (True = visible) or additive float mask."""
    return mask if mask.dtype == torch.bool else mask > _HIDDEN_BELOW


def _structural_visibility(
    rows: torch.Tensor, lq: int, lk: int, *, causal: bool, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """[r, Lk] bool visibility from the causal/window rules, or None when every key is visible.

    Follows transformers' SDPA convention for a missing mask: a one-query call sees every key; several queries
    against more keys are top-left aligned (the keys past the queries are empty slots of a static cache).
    """
    if not causal or lq == 1:
        return None
    cols = torch.arange(lk, device=device)
    visible = cols[None, :] <= rows[:, None]
    if sliding_window is not None:
        visible &= cols[None, :] > rows[:, None] - sliding_window
    return visible


def block_bias_and_visibility(
    mask: torch.Tensor | None,
    row_start: int,
    row_end: int,
    lq: int,
    lk: int,
    *,
    causal: bool,
    sliding_window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Additive logit bias and boolean visibility for query rows [row_start, row_end).

    `mask` is transformers' 4-D mask [B, 1|H, Lq, Lk]: bool (True = visible) or additive float (0 or a bias where
    visible, a very negative number where hidden). Returns (bias or None, visible or None), each broadcastable to
    [B, H, rows, Lk]; None means "no bias" / "all visible".
    """
    if mask is None:
        rows = torch.arange(row_start, row_end, device=device)
        visible = _structural_visibility(rows, lq, lk, causal=causal, sliding_window=sliding_window, device=device)
        return None, visible
    block = mask[:, :, row_start:row_end, :lk]
    if block.dtype == torch.bool:
        return None, block
    return block.float(), _visible(block)


def visible_rows(mask: torch.Tensor | None, batch: int, lq: int, device: torch.device) -> torch.Tensor:
    """[B, Lq] bool: query rows that see at least one key (rows of left padding see none)."""
    if mask is None:
        return torch.ones(batch, lq, dtype=torch.bool, device=device)
    return _visible(mask).any(dim=-1).all(dim=1).expand(batch, lq)
