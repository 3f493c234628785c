"""Per-query attention maps re-centred on their query, sampled from every (layer, head): the input of the pattern
summary (`pattern_clusters.summarize_patterns`).

Images: a map over patch offsets (dr, dc) in [-(rows-1), rows-1] x [-(cols-1), cols-1], the query at the centre;
CLS / register keys are left out (their share is `1 - map.sum()`). Text: one row, column 0 the attention on the
first (special) tokens, then token offsets -(window-1) .. 0 (causal) or .. +(window-1) (bidirectional); keys
further away are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels.blocks import DEFAULT_BLOCK_ELEMENTS
from ..methods.base import AttentionCall
from .capture import Geometry, TokenLayout, layout, observe_forward, probability_blocks


@dataclass
class PatternSet:
    """Sampled maps [N, h, w] (probabilities, float32) with their `layer` [N] and `head` [N]; `num_heads`
    {layer: heads}. Image maps are centred at (rows - 1, cols - 1); text maps have the special slot in column 0 and
    the query (offset 0) in column `window`. `support` [N, h, w] marks the cells that hold a key the query can
    see (None: all); the others are 0 because no key is there (grid edge, start of the text), not by attention."""

    geometry: Geometry
    maps: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    num_heads: dict[int, int]
    window: int | None = None
    support: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.maps.shape[0])


class PatternCollector:
    """The `observe` callback that samples `queries` query rows per sequence and call (the same rows for every head
    of the call) and keeps their re-centred maps."""

    def __init__(
        self,
        geometry: Geometry,
        *,
        queries: int = 8,
        window: int = 32,
        layers: Iterable[int] | None = None,
        seed: int = 0,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ):
        if queries < 1 or window < 1:
            raise ValueError(f"queries and window must be >= 1, got {queries} and {window}")
        self.geometry = geometry
        self.queries = queries
        self.window = window
        self.layers = None if layers is None else set(layers)
        self.generator = torch.Generator().manual_seed(seed)
        self.block_elements = block_elements
        self._maps: list[torch.Tensor] = []
        self._support: list[torch.Tensor] = []
        self._layer: list[torch.Tensor] = []
        self._head: list[torch.Tensor] = []
        self.num_heads: dict[int, int] = {}

    def _choose(self, candidates: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: up to `queries` random rows among each row's candidates."""
        keys = torch.rand(candidates.shape, generator=self.generator).to(candidates.device)
        keys = keys.masked_fill(~candidates, 2.0)
        rank = keys.argsort(dim=-1).argsort(dim=-1)
        return candidates & (rank < self.queries)

    def _image_canvas(self, lay: TokenLayout, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[n, h, (2R-1) * (2C-1)] re-centred patch maps for query token rows `rows` [n]."""
        prefix = self.geometry.prefix
        grid_r, grid_c = self.geometry.grid_for(probs.shape[-1])
        width = 2 * grid_c - 1
        q = lay.coords[rows - prefix]  # [n, 2]
        offset = lay.coords[None, :, :] - q[:, None, :] + torch.tensor([grid_r - 1, grid_c - 1], device=q.device)
        index = offset[..., 0] * width + offset[..., 1]  # [n, P]
        n, h = probs.shape[:2]
        canvas = probs.new_zeros(n, h, (2 * grid_r - 1) * width)
        return canvas.scatter_(2, index[:, None, :].expand(n, h, -1), probs[:, :, prefix:])

    def _text_canvas(
        self, lay: TokenLayout, probs: torch.Tensor, batch: torch.Tensor, rows: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        """[n, h, 1 + span] maps: special mass, then offsets -(window-1) .. 0 (or .. window-1)."""
        span = self.window if causal else 2 * self.window - 1
        offset = lay.positions[batch] - lay.positions[batch, rows][:, None] + self.window - 1  # [n, Lk]
        keep = lay.real[batch] & ~lay.special[batch] & (offset >= 0) & (offset < span)
        index = torch.where(keep, offset + 1, span + 1)
        index = torch.where(lay.special[batch], 0, index)
        n, h = probs.shape[:2]
        canvas = probs.new_zeros(n, h, span + 2)
        canvas.scatter_add_(2, index[:, None, :].expand(n, h, -1), probs)
        return canvas[:, :, : span + 1]

    def __call__(self, call: AttentionCall) -> None:
        if self.layers is not None and call.layer not in self.layers:
            return
        lay = layout(call, self.geometry)
        chosen = self._choose(lay.real & ~lay.special)
        self.num_heads[call.layer] = call.query.shape[1]
        for block in probability_blocks(call, block_elements=self.block_elements):
            batch, rows = chosen[:, block.r0 : block.r1].nonzero(as_tuple=True)
            if not len(rows):
                continue
            probs = block.probs[batch, :, rows]  # [n, h, Lk]
            visible = block.visible[batch, 0, rows][:, None].to(probs.dtype)  # [n, 1, Lk], the same for every head
            rows = rows + block.r0
            if self.geometry.kind == "image":
                canvas, support = (self._image_canvas(lay, p, rows) for p in (probs, visible))
                grid_r, grid_c = self.geometry.grid_for(probs.shape[-1])
                shape = (2 * grid_r - 1, 2 * grid_c - 1)
            else:
                canvas, support = (self._text_canvas(lay, p, batch, rows, call.causal) for p in (probs, visible))
                shape = (1, canvas.shape[-1])
            n, h = canvas.shape[:2]
            self._maps.append(canvas.reshape(n * h, *shape).float().cpu())
            self._support.append((support > 0).expand(n, h, -1).reshape(n * h, *shape).cpu())
            self._layer.append(torch.full((n * h,), call.layer))
            self._head.append(block.heads.cpu().repeat(n))

    def result(self) -> PatternSet:
        if not self._maps:
            raise RuntimeError("no attention map was collected; did the model run a forward pass?")
        shapes = {tuple(m.shape[1:]) for m in self._maps}
        if len(shapes) > 1:
            raise ValueError(f"maps of different shapes {sorted(shapes)}: use one image size (or text mode) per set")
        return PatternSet(
            geometry=self.geometry,
            maps=torch.cat(self._maps),
            support=torch.cat(self._support),
            layer=torch.cat(self._layer),
            head=torch.cat(self._head),
            num_heads=dict(sorted(self.num_heads.items())),
            window=self.window if self.geometry.kind == "text" else None,
        )


def collect_patterns(
    model: nn.Module,
    data: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    geometry: Geometry,
    *,
    queries: int = 8,
    window: int = 32,
    layers: Iterable[int] | None = None,
    seed: int = 0,
) -> PatternSet:
    """Re-centred attention maps of `queries` random query rows per sequence, every head of every layer (or of
    `layers`), over `data` (model-input dicts as in `distance_profile`); outputs are unchanged."""
    collector = PatternCollector(geometry, queries=queries, window=window, layers=layers, seed=seed)
    device = next(model.parameters()).device
    for batch in [data] if isinstance(data, Mapping) else data:
        observe_forward(model, collector, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return collector.result()
