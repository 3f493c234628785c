"""Visibility of keys to queries, one block of query rows at a time (never the full [Lq, Lk] unless given)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


def hidden_below(dtype: torch.dtype) -> float:
    """An additive float mask hides a key where its value is at or below half the dtype's most negative number.

    transformers fills hidden keys with finfo(dtype).min (-65504 in fp16, -3.4e38 in fp32 and bf16) and a sum of
    two such fills saturates there or at -inf; a real bias (ALiBi, relative positions) is orders of magnitude above
    half of it in every float dtype. A fixed level (such as -1e30) would read every fp16 mask as all visible."""
    return torch.finfo(dtype).min / 2


@dataclass
class KeyRanges:
    """Per query row, the visible keys form one interval [lo, hi) (lo >= hi: the row sees nothing).

    This is the mask form the Triton kernels take: it covers causal masks (any query offset, as with a KV cache),
    left or right padding and sliding windows, at O(B * Lq) memory.
    """

    lo: torch.Tensor  # [B, Lq] int32
    hi: torch.Tensor  # [B, Lq] int32

    def visibility(self, row_start: int, row_end: int, lk: int, first_key: int = 0) -> torch.Tensor:
        """[B, 1, rows, Lk - first_key] bool for query rows [row_start, row_end) and keys [first_key, lk)."""
        cols = torch.arange(first_key, lk, device=self.lo.device)
        lo = self.lo[:, None, row_start:row_end, None]
        hi = self.hi[:, None, row_start:row_end, None]
        return (cols >= lo) & (cols < hi)

    def block_extent(self, row_start: int, row_end: int) -> tuple[int, int, int, int]:
        """(k0, k1, f0, f1) for rows [row_start, row_end): [k0, k1) holds every key some row sees, [f0, f1) (empty
        when f0 >= f1) the keys every row sees. A causal block is masked only outside [f0, f1): its diagonal."""
        return self.block_extents(row_start, row_end, row_end - row_start)[0]

    def block_extents(self, row_start: int, row_end: int, rows: int) -> list[tuple[int, int, int, int]]:
        """`block_extent` of each block of `rows` rows in [row_start, row_end), computed at once."""
        lo, hi = self.lo[:, row_start:row_end].long(), self.hi[:, row_start:row_end].long()
        pad = -(row_end - row_start) % rows
        big = int(max(int(hi.max()), int(lo.max()), 0)) + 1 if lo.numel() else 1
        seen = lo < hi

        def blocks(x: torch.Tensor, fill: int) -> torch.Tensor:  # [B, r] -> [blocks, B * rows]
            x = torch.nn.functional.pad(x, (0, pad), value=fill)
            return x.reshape(x.shape[0], -1, rows).transpose(0, 1).reshape(-1, x.shape[0] * rows)

        k0 = blocks(torch.where(seen, lo, big), big).amin(1)
        k1 = blocks(torch.where(seen, hi, -1), -1).amax(1)
        f0, f1 = blocks(lo, -big).amax(1), blocks(hi, big).amin(1)
        empty = k1 < 0
        k0, k1 = torch.where(empty, 0, k0), torch.where(empty, 0, k1)
        return list(zip(k0.tolist(), k1.tolist(), f0.tolist(), f1.tolist(), strict=True))

    def nonempty(self) -> torch.Tensor:
        """[B, Lq] bool: rows that see at least one key."""
        return self.lo < self.hi


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean visibility of a bool (True = visible) or additive float mask."""
    return mask if mask.dtype == torch.bool else mask > hidden_below(mask.dtype)


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
    mask: torch.Tensor | KeyRanges | None,
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
    visible, a very negative number where hidden), or KeyRanges. Returns (bias or None, visible or None), each
    broadcastable to [B, H, rows, Lk]; None means "no bias" / "all visible".
    """
    if mask is None:
        rows = torch.arange(row_start, row_end, device=device)
        visible = _structural_visibility(rows, lq, lk, causal=causal, sliding_window=sliding_window, device=device)
        return None, visible
    if isinstance(mask, KeyRanges):
        return None, mask.visibility(row_start, row_end, lk)
    block = mask[:, :, row_start:row_end, :lk]
    if block.dtype == torch.bool:
        return None, block
    return block.float(), _visible(block)


def columns_bias_and_visibility(
    mask: torch.Tensor | KeyRanges | None,
    columns: torch.Tensor,
    row_start: int,
    row_end: int,
    lq: int,
    lk: int,
    *,
    causal: bool,
    sliding_window: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`block_bias_and_visibility` at chosen keys only: columns [B, H, K] (key positions, -1 = none) give (bias
    [B, 1|H, rows, K] float32 or None, visible [B, H, rows, K] bool) for query rows [row_start, row_end)."""
    b, h, n = columns.shape
    device = columns.device
    present = (columns >= 0)[:, :, None, :]
    cols = columns.clamp_min(0)[:, :, None, :]  # [B, H, 1, K]
    rows = torch.arange(row_start, row_end, device=device)[None, None, :, None]
    bias = None
    if mask is None:
        visible = present.expand(b, h, row_end - row_start, n)
        if causal and lq > 1:
            visible = visible & (cols <= rows)
            if sliding_window is not None:
                visible = visible & (cols > rows - sliding_window)
    elif isinstance(mask, KeyRanges):
        lo = mask.lo[:, None, row_start:row_end, None].expand(b, 1, -1, 1)
        hi = mask.hi[:, None, row_start:row_end, None].expand(b, 1, -1, 1)
        visible = present & (cols >= lo) & (cols < hi)
    else:
        block = mask[:, :, row_start:row_end, :lk]
        block = block.expand(b, h if block.shape[1] == 1 else block.shape[1], -1, -1)
        picked = block.gather(-1, cols.expand(b, h, row_end - row_start, n))
        visible = present & _visible(picked)
        bias = None if picked.dtype == torch.bool else picked.float()
    return bias, visible


def rows_bias_and_visibility(
    mask: torch.Tensor | KeyRanges | None,
    batch: torch.Tensor,
    heads: torch.Tensor,
    rows: torch.Tensor,
    lq: int,
    lk: int,
    *,
    causal: bool,
    sliding_window: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`block_bias_and_visibility` of chosen (batch, head, row) triples (each [n]): (bias [n, Lk] float32 or None,
    visible [n, Lk] bool or None = all visible)."""
    cols = torch.arange(lk, device=rows.device)
    if mask is None:
        return None, _structural_visibility(
            rows, lq, lk, causal=causal, sliding_window=sliding_window, device=rows.device
        )
    if isinstance(mask, KeyRanges):
        return None, (cols >= mask.lo[batch, rows, None]) & (cols < mask.hi[batch, rows, None])
    picked = mask[
        batch if mask.shape[0] > 1 else torch.zeros_like(batch),
        heads if mask.shape[1] > 1 else torch.zeros_like(heads),
        rows,
        :lk,
    ]
    return (None, picked) if picked.dtype == torch.bool else (picked.float(), _visible(picked))


def dense_bias_and_visibility(
    mask: torch.Tensor | KeyRanges | None,
    lq: int,
    lk: int,
    *,
    causal: bool,
    sliding_window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`block_bias_and_visibility` for every query row at once, with the visibility always a 4-D bool tensor
    [B|1, H|1, Lq, Lk] (all True when nothing is hidden). For the materialised paths (oracle, training attention)."""
    bias, visible = block_bias_and_visibility(
        mask, 0, lq, lq, lk, causal=causal, sliding_window=sliding_window, device=device
    )
    if visible is None:
        visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
    return bias, visible.reshape(-1, visible.shape[-3] if visible.dim() == 4 else 1, lq, lk)


def query_rows(
    query_valid: torch.Tensor | None, mask: torch.Tensor | KeyRanges | None, batch: int, lq: int, device: torch.device
) -> torch.Tensor:
    """[B, Lq] bool rows that count: `query_valid` when given, else the rows that see a key."""
    if query_valid is None:
        query_valid = visible_rows(mask, batch, lq, device)
    return query_valid.to(device).expand(batch, lq)


def visible_rows(mask: torch.Tensor | KeyRanges | None, batch: int, lq: int, device: torch.device) -> torch.Tensor:
    """[B, Lq] bool: query rows that see at least one key (rows of left padding see none)."""
    if mask is None:
        return torch.ones(batch, lq, dtype=torch.bool, device=device)
    if isinstance(mask, KeyRanges):
        return mask.nonempty().expand(batch, lq)
    return _visible(mask).any(dim=-1).all(dim=1).expand(batch, lq)


def structural_ranges(
    batch: int, lq: int, lk: int, *, causal: bool, sliding_window: int | None, device: torch.device
) -> KeyRanges:
    """KeyRanges of the causal/window rules without a mask (same convention as `_structural_visibility`)."""
    rows = torch.arange(lq, device=device, dtype=torch.int32)
    if not causal or lq == 1:
        lo, hi = torch.zeros_like(rows), torch.full_like(rows, lk)
    else:
        hi = (rows + 1).clamp(max=lk)
        lo = (rows - sliding_window + 1).clamp(min=0) if sliding_window is not None else torch.zeros_like(rows)
    return KeyRanges(lo=lo.expand(batch, lq).contiguous(), hi=hi.expand(batch, lq).contiguous())


# 4-D masks already turned into KeyRanges during one model forward: every layer of a forward passes the same mask
# tensor (models with sliding-window layers alternate two), and checking a mask reads values back from the GPU, so
# it is done once per forward. The memo belongs to the forward: the integration creates one per forward and hands it
# to the ops through `AttentionCall.mask_memo`; without one nothing is remembered, since a mask could be edited in
# place between calls.
MaskMemo = dict  # (id, shape args) -> (weak reference to the mask, KeyRanges or None, reason or None)


def to_key_ranges(
    mask: torch.Tensor | KeyRanges | None,
    batch: int,
    lq: int,
    lk: int,
    *,
    causal: bool,
    sliding_window: int | None,
    device: torch.device,
    block_elements: int = 1 << 24,
    memo: MaskMemo | None = None,
) -> tuple[KeyRanges | None, str | None]:
    """(KeyRanges, None) when the mask is one interval of keys per row, else (None, reason it is not).

    A transformers 4-D mask qualifies when it has no per-head part, no additive bias (only 0 or "hidden") and each
    row's visible keys are contiguous. Checked block by block of rows (at most `block_elements` mask elements).
    `memo`: a forward's MaskMemo; a mask already checked in it (the same tensor object, still alive) is not read again.
    """
    if isinstance(mask, KeyRanges):
        return mask, None
    if mask is None:
        return structural_ranges(batch, lq, lk, causal=causal, sliding_window=sliding_window, device=device), None
    if memo is None:
        return _mask_ranges(mask, batch, lq, lk, device=device, block_elements=block_elements)
    key = (id(mask), batch, lq, lk, str(device), block_elements)
    hit = memo.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1], hit[2]
    ranges, reason = _mask_ranges(mask, batch, lq, lk, device=device, block_elements=block_elements)
    memo[key] = (weakref.ref(mask), ranges, reason)
    return ranges, reason


def _mask_ranges(
    mask: torch.Tensor, batch: int, lq: int, lk: int, *, device: torch.device, block_elements: int
) -> tuple[KeyRanges | None, str | None]:
    """`to_key_ranges` for a transformers 4-D mask (not memoised)."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        return None, f"a per-head attention mask of shape {tuple(mask.shape)}"
    mask = mask[..., :lk]
    b = mask.shape[0]
    lo = torch.empty(b, lq, dtype=torch.int32, device=device)
    hi = torch.empty(b, lq, dtype=torch.int32, device=device)
    rows_per_block = max(1, block_elements // max(1, b * lk))
    positions = torch.arange(1, lk + 1, device=device, dtype=torch.int32)
    for r0 in range(0, lq, rows_per_block):
        r1 = min(lq, r0 + rows_per_block)
        block = mask[:, 0, r0:r1]
        visible = _visible(block)
        if block.dtype != torch.bool and bool((block.masked_fill(~visible, 0) != 0).any()):
            return None, "an additive attention mask with a bias (e.g. ALiBi)"
        count = visible.sum(-1, dtype=torch.int32)
        first = torch.where(visible, positions, lk + 1).amin(-1) - 1
        last = torch.where(visible, positions, 0).amax(-1)
        if bool(((last - first != count) & (count > 0)).any()):
            return None, "an attention mask whose visible keys are not one interval per row"
        lo[:, r0:r1] = torch.where(count > 0, first, 0)
        hi[:, r0:r1] = torch.where(count > 0, last, 0)
    return KeyRanges(lo=lo.expand(batch, lq), hi=hi.expand(batch, lq)), None


def ranges_visible_count(ranges: KeyRanges, query_valid: torch.Tensor, lk: int) -> torch.Tensor:
    """[B, 1, Lk] float32: number of valid query rows that see each key (a difference array, O(B (Lq + Lk)))."""
    weight = (query_valid & ranges.nonempty()).float()
    lo = ranges.lo.long().clamp(0, lk)
    hi = ranges.hi.long().clamp(0, lk)
    delta = torch.zeros(weight.shape[0], lk + 1, dtype=torch.float32, device=weight.device)
    delta.scatter_add_(1, lo, weight).scatter_add_(1, hi, -weight)
    return delta.cumsum(1)[:, None, :lk]


def padding_ranges(
    attention_mask: torch.Tensor, lq: int, *, causal: bool = True, sliding_window: int | None = None
) -> KeyRanges:
    """KeyRanges from a 2-D padding mask [B, Lk] (1 = real token; left or right padding): the Lq queries are the last
    Lq positions (a KV cache before them), causal rows see keys up to their own position, windows count back from it.
    """
    valid = attention_mask.bool()
    b, lk = valid.shape
    positions = torch.arange(1, lk + 1, device=valid.device)
    first = torch.where(valid, positions, lk + 1).amin(-1) - 1  # [B]
    last = torch.where(valid, positions, 0).amax(-1)  # [B], one past the last real key
    count = valid.sum(-1)
    if bool((((last - first) != count) & (count > 0)).any()):
        raise ValueError("padding_ranges needs left or right padding (each row's real tokens in one block)")
    own = torch.arange(lk - lq, lk, device=valid.device)  # absolute position of each query row
    lo = first[:, None].expand(b, lq)
    hi = torch.where(count > 0, last, 0)[:, None].expand(b, lq)
    if causal:
        hi = torch.minimum(hi, own[None, :] + 1)
        if sliding_window is not None:
            lo = torch.maximum(lo, own[None, :] - sliding_window + 1)
    return KeyRanges(lo=lo.to(torch.int32).contiguous(), hi=hi.to(torch.int32).contiguous())
