"""Attention distance profiles: per (layer, head), how much attention goes to keys at each spatial distance (image
patches) or token distance (text), and the attention-weighted mean distance ("attention distance", Dosovitskiy et al.
2021) with its trend across layers (Li et al., TVCG 2023; the README's "Attention analysis and the visual report").

Streaming: every attention call's probabilities are recomputed from its q and k one block of query rows at a time,
reduced into per-bin sums and dropped, so memory stays O(block + bins) whatever the sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels.blocks import DEFAULT_BLOCK_ELEMENTS
from ..methods.base import AttentionCall
from .capture import Geometry, TokenLayout, layout, observe_forward, probability_blocks


def text_edges(limit: int = 1 << 16) -> torch.Tensor:
    """Token-distance bin edges 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (half-octave steps) up to `limit`."""
    edges = [0, 1, 2, 3, 4]
    while edges[-1] < limit:
        edges += [edges[-1] * 3 // 2, edges[-1] * 2]
    return torch.tensor(edges, dtype=torch.float64)


def image_edges(max_distance: float) -> torch.Tensor:
    """Patch-distance bins of width 1 centred on 0, 1, 2, ... up to `max_distance`."""
    return torch.arange(math.floor(max_distance + 0.5) + 2, dtype=torch.float64) - 0.5


@dataclass
class DistanceProfile:
    """Distance statistics of every (layer, head), tensors indexed [L, H, ...] (H: the largest head count; missing
    heads are 0). Bin b holds distances in [edges[b], edges[b + 1]).

    mass: attention of a query row on the keys of each bin, averaged over query rows. special_mass: the same for the
    excluded keys (CLS / registers, or the first text tokens), so mass summed over bins plus special_mass is 1.
    mean_distance: attention-weighted mean distance over non-special keys. uniform_distance [L]: the mean distance
    a head attending uniformly to every visible non-special key would have (the baseline for mean_distance).
    pairs: (query, visible key) pairs per bin; rows: query rows counted (special query rows are left out).
    """

    geometry: Geometry
    layers: list[int]
    num_heads: list[int]
    edges: torch.Tensor
    mass: torch.Tensor
    special_mass: torch.Tensor
    mean_distance: torch.Tensor
    uniform_distance: torch.Tensor
    pairs: torch.Tensor
    rows: torch.Tensor

    @property
    def centres(self) -> torch.Tensor:
        """[nb] representative distance of each bin (its midpoint; text bins of width 1 are their integer)."""
        lo, hi = self.edges[:-1], self.edges[1:]
        return torch.where(hi - lo <= 1, lo.clamp_min(0).ceil(), (lo + hi - 1) / 2)

    def density(self) -> torch.Tensor:
        """[L, H, nb] average probability of one (query, key) pair at each distance (0 where a bin has no pairs)."""
        pairs = self.pairs[:, None, :]
        return torch.where(pairs > 0, self.mass * self.rows[:, None, None] / pairs.clamp_min(1), 0.0)

    def peak_distance(self, by: str = "mass") -> torch.Tensor:
        """[L, H] centre of the bin with the most attention ("mass") or the highest per-pair probability
        ("density")."""
        values = {"mass": self.mass, "density": self.density()}[by]
        return self.centres[values.argmax(-1)]

    def layer_trend(self) -> dict[str, list[float]]:
        """Per layer: mean, min and max over its heads of the mean distance, the uniform-attention baseline, and the
        mean special mass."""
        out: dict[str, list[float]] = {"mean": [], "min": [], "max": [], "uniform": [], "special_mass": []}
        for i, n in enumerate(self.num_heads):
            d = self.mean_distance[i, :n]
            out["mean"].append(float(d.mean()))
            out["min"].append(float(d.min()))
            out["max"].append(float(d.max()))
            out["uniform"].append(float(self.uniform_distance[i]))
            out["special_mass"].append(float(self.special_mass[i, :n].mean()))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: geometry, bins, per-head mass / mean distance / peaks (by mass, by
        per-key density), pairs per bin, and the layer trend."""
        g = self.geometry
        return {
            "geometry": {"kind": g.kind, "prefix": g.prefix, "grid": g.grid, "metric": g.metric},
            "layers": self.layers,
            "num_heads": self.num_heads,
            "edges": self.edges.tolist(),
            "mass": self.mass.tolist(),
            "special_mass": self.special_mass.tolist(),
            "mean_distance": self.mean_distance.tolist(),
            "uniform_distance": self.uniform_distance.tolist(),
            "peak_distance": self.peak_distance().tolist(),
            "peak_density_distance": self.peak_distance("density").tolist(),
            "pairs": self.pairs.tolist(),
            "rows": self.rows.tolist(),
            "trend": self.layer_trend(),
        }


class DistanceAccumulator:
    """The `observe` callback that builds a DistanceProfile from the attention calls it is handed."""

    def __init__(
        self,
        geometry: Geometry,
        *,
        edges: torch.Tensor | None = None,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ):
        self.geometry = geometry
        self.edges = None if edges is None else torch.as_tensor(edges, dtype=torch.float64)
        self.block_elements = block_elements
        self._sums: dict[int, dict[str, torch.Tensor]] = {}

    def _edges_for(self, tokens: int) -> torch.Tensor:
        g = self.geometry
        if self.edges is None:
            self.edges = image_edges(g.max_distance(tokens)) if g.kind == "image" else text_edges()
        reach = g.max_distance(tokens) if g.kind == "image" else tokens - 1
        if self.edges.dim() != 1 or len(self.edges) < 2 or bool((self.edges.diff() <= 0).any()):
            raise ValueError("edges must be an increasing 1-D sequence of at least 2 values")
        if float(self.edges[0]) > 0 or float(self.edges[-1]) <= reach:
            raise ValueError(f"edges [{float(self.edges[0])}, {float(self.edges[-1])}) do not cover 0..{reach}")
        return self.edges

    def _state(self, layer: int, heads: int, bins: int, device: torch.device) -> dict[str, torch.Tensor]:
        if layer not in self._sums:
            zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
            self._sums[layer] = {
                "mass": zeros(heads, bins + 2),  # bins, then special keys, then nothing (masked entries)
                "dist": zeros(heads),
                "pairs": zeros(bins + 2),
                "pair_dist": zeros(()),
                "rows": zeros(()),
            }
        return self._sums[layer]

    def _distances(self, lay: TokenLayout, r0: int, r1: int) -> torch.Tensor:
        """[B, r, Lk] distance of each (query, key) pair of rows [r0, r1)."""
        if lay.coords is not None:
            prefix = self.geometry.prefix
            coords = torch.cat([lay.coords.new_zeros(prefix, 2), lay.coords])
            return self.geometry.patch_distance(coords[r0:r1, None, :], coords[None, :, :])[None]
        pos = lay.positions
        return (pos[:, r0:r1, None] - pos[:, None, :]).abs().double()

    def __call__(self, call: AttentionCall) -> None:
        lay = layout(call, self.geometry)
        lk = call.key.shape[2]
        edges = self._edges_for(lk).to(call.query.device)
        bins = len(edges) - 1
        state = self._state(call.layer, call.query.shape[1], bins, call.query.device)
        key_ok = (lay.real & ~lay.special)[:, None, :]  # [B, 1, Lk]
        for block in probability_blocks(call, block_elements=self.block_elements):
            r0, r1 = block.r0, block.r1
            rows = (lay.real & ~lay.special)[:, r0:r1]  # [B, r]
            distance = self._distances(lay, r0, r1).double()  # [1|B, r, Lk]
            index = (torch.bucketize(distance, edges, right=True) - 1).clamp(0, bins - 1)
            index = torch.where(lay.special[:, None, :], bins, index.expand(rows.shape[0], -1, -1))
            index = torch.where(rows[:, :, None] & lay.real[:, None, :], index, bins + 1)  # [B, r, Lk]
            probs = block.probs.double() * rows[:, None, :, None]
            b, h = probs.shape[:2]
            flat = index.reshape(b, 1, -1).expand(b, h, -1)
            mass = torch.zeros(b, h, bins + 2, dtype=torch.float64, device=probs.device)
            mass.scatter_add_(2, flat, probs.reshape(b, h, -1))
            state["mass"][block.heads.to(probs.device)] += mass.sum(0)
            weighted = (probs * (distance * key_ok)[:, None]).sum((0, 2, 3))  # special / pad keys count 0
            state["dist"][block.heads.to(probs.device)] += weighted
            if bool((block.heads == 0).any()):  # visibility and rows are the same for every head group
                seen = (block.visible[:, 0] & rows[:, :, None] & key_ok).double()
                counts = torch.zeros(b, bins + 2, dtype=torch.float64, device=probs.device)
                counts.scatter_add_(1, index.reshape(b, -1), seen.reshape(b, -1))
                state["pairs"] += counts.sum(0)
                state["pair_dist"] += (seen * distance).sum()
                state["rows"] += rows.sum()

    def result(self) -> DistanceProfile:
        """The profile of every call seen so far."""
        if not self._sums:
            raise RuntimeError("no attention call was observed; did the model run a forward pass?")
        layers = sorted(self._sums)
        heads = [int(self._sums[layer]["mass"].shape[0]) for layer in layers]
        width = max(heads)
        bins = self._sums[layers[0]]["pairs"].shape[0] - 2
        mass = torch.zeros(len(layers), width, bins + 2, dtype=torch.float64)
        dist = torch.zeros(len(layers), width, dtype=torch.float64)
        pairs = torch.stack([self._sums[layer]["pairs"].cpu() for layer in layers])
        rows = torch.stack([self._sums[layer]["rows"].cpu() for layer in layers])
        pair_dist = torch.stack([self._sums[layer]["pair_dist"].cpu() for layer in layers])
        for i, layer in enumerate(layers):
            mass[i, : heads[i]] = self._sums[layer]["mass"].cpu()
            dist[i, : heads[i]] = self._sums[layer]["dist"].cpu()
        regular = mass[:, :, :bins].sum(-1)
        used = int(torch.nonzero(pairs[:, :bins].sum(0)).max()) + 1 if bool(pairs[:, :bins].any()) else bins
        per_row = rows.clamp_min(1)[:, None, None]
        return DistanceProfile(
            geometry=self.geometry,
            layers=layers,
            num_heads=heads,
            edges=self.edges[: used + 1].cpu().float(),
            mass=(mass[:, :, :used] / per_row).float(),
            special_mass=(mass[:, :, bins] / per_row[..., 0]).float(),
            mean_distance=torch.where(regular > 0, dist / regular.clamp_min(1e-30), 0.0).float(),
            uniform_distance=(pair_dist / pairs[:, :bins].sum(-1).clamp_min(1)).float(),
            pairs=pairs[:, :used].float(),
            rows=rows.float(),
        )


def _batches(data: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    return [data] if isinstance(data, Mapping) else data


def distance_profile(
    model: nn.Module,
    data: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    geometry: Geometry,
    *,
    edges: torch.Tensor | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> DistanceProfile:
    """Distance profile of every attention layer of `model` over `data` (a dict of model inputs, e.g.
    {"pixel_values": ...} or {"input_ids", "attention_mask"}, or an iterable of them); outputs are unchanged.
    `edges`: bin edges (default: width-1 bins for images, half-octave bins for text)."""
    acc = DistanceAccumulator(geometry, edges=edges, block_elements=block_elements)
    device = next(model.parameters()).device
    for batch in _batches(data):
        observe_forward(model, acc, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return acc.result()
