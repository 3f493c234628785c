"""The `adapter` method: differentiable attention on chosen layers, with the inputs and outputs training needs.

`attnpatch.apply(model, "adapter", layers=[...])` routes the chosen layers through `kernels.biased_attention` whenever
something is asked of them, and through the model's own attention otherwise (so an idle adapter costs nothing and
changes nothing). What can be asked, all state on the method instance (the Patch's), none in the model:

- perturbations: an additive pre-softmax term per layer, [B|1, Hq|1, Lq, Lk], zeroed on hidden keys (`perturbed`);
- gradient leaves: a zero perturbation per layer that requires grad, so `torch.autograd.grad(loss, leaves)` gives
  dL/dS of the softmax logits without touching any parameter gradient (`perturbation_leaves`);
- recorded logits: the clean scores of each call, detached (`recording_logits`; iAT's difference directions);
- probes: the probability row of (layer, head, query) for every sequence, [B, Lk], differentiable (`add_probe`);
- key biases: `weight[layer][h] * segments[b, key]` added to chosen heads' logits, with `segments` over absolute key
  positions, so the bias follows the keys through a KV cache (`set_key_bias`; intention conditioning).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.biased_attention import biased_attention
from .base import TEXT_FAMILIES, AttentionCall, Method, register_method
from .validators import check_head, check_layer


@dataclass(frozen=True)
class AdapterConfig:
    """Options of `attnpatch.apply(model, "adapter", ...)`. layers: the layers the adapters reach (None: all)."""

    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise ValueError(f"layers must be a list of layer indices or None, got {self.layers!r}")
            for layer in self.layers:
                if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                    raise ValueError(f"layers must hold integers, got {layer!r}")


@dataclass(frozen=True)
class Probe:
    """The attention probabilities of `head` in `layer` for the query at `query` (negative: from the end)."""

    layer: int
    head: int
    query: int


@register_method
class AdapterAttention(Method):
    name = "adapter"
    config_class = AdapterConfig
    families = TEXT_FAMILIES
    neutral_options = {}  # an idle adapter (nothing asked of it) runs the model's own attention

    def __init__(self, config: AdapterConfig, num_layers: int, num_heads: list[int]):
        super().__init__(config, num_layers, num_heads)
        layers = range(num_layers) if config.layers is None else config.layers
        self.adapter_layers = sorted({check_layer("layers", layer, num_layers) for layer in layers})
        self.perturbations: dict[int, torch.Tensor] = {}
        self.leaves: dict[int, torch.Tensor] | None = None
        self._leaf_layers: set[int] = set()
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.probes: dict[str, Probe] = {}
        self.probe_values: dict[str, torch.Tensor] = {}
        self.key_bias_weights: dict[int, torch.Tensor] = {}
        self.key_segments: torch.Tensor | None = None

    def layers(self) -> set[int]:
        return set(self.adapter_layers)

    # ---- what callers ask for -------------------------------------------------------------------------------------

    def check_layer(self, layer: Any, what: str) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer not in self.adapter_layers:
            raise ValueError(
                f"{what}: layer {layer!r} is not reached by this adapter (its layers: {self.adapter_layers}); "
                "apply the adapter with layers=[...] that include it"
            )
        return int(layer)

    @contextlib.contextmanager
    def perturbed(self, perturbations: dict[int, torch.Tensor]) -> Iterator[None]:
        """Add `perturbations[layer]` ([B|1, Hq|1, Lq, Lk]) to the logits of those layers inside the block."""
        checked = {self.check_layer(layer, "perturbation"): value for layer, value in perturbations.items()}
        for layer, value in checked.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 4:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"perturbation for layer {layer} must be a 4-D tensor [batch, heads, queries, keys], got {shape}"
                )
        saved, self.perturbations = self.perturbations, checked
        try:
            yield
        finally:
            self.perturbations = saved

    @contextlib.contextmanager
    def perturbation_leaves(self, layers: Sequence[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
        """Inside the block every call of `layers` (default: all adapter layers) adds a fresh zero tensor
        [B, Hq, Lq, Lk] that requires grad; the dict yielded maps layer -> that tensor after the forward."""
        chosen = self.adapter_layers if layers is None else [self.check_layer(x, "perturbation_leaves") for x in layers]
        leaves: dict[int, torch.Tensor] = {}
        saved, self.leaves = self.leaves, leaves
        self._leaf_layers = set(chosen)
        try:
            yield leaves
        finally:
            self.leaves = saved

    @contextlib.contextmanager
    def recording_logits(self) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Inside the block, record (logits [B, Hq, Lq, Lk], visible) of every adapter layer, detached."""
        recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        saved, self.recorded = self.recorded, recorded
        try:
            yield recorded
        finally:
            self.recorded = saved

    def add_probe(self, name: str, layer: int, head: int, query: int = 0) -> Probe:
        """Keep the probabilities [B, Lk] of (layer, head, query) of every later forward in `probe_values[name]`."""
        layer = self.check_layer(layer, f"probe {name!r}")
        head = check_head(f"probe {name!r}", layer, head, self.num_heads[layer])
        if isinstance(query, bool) or not isinstance(query, numbers.Integral):
            raise ValueError(f"probe {name!r}: query must be an integer position, got {query!r}")
        probe = Probe(layer, int(head), int(query))
        self.probes[name] = probe
        return probe

    def remove_probe(self, name: str) -> None:
        self.probes.pop(name, None)
        self.probe_values.pop(name, None)

    def set_key_bias(self, weights: dict[int, torch.Tensor] | None, segments: torch.Tensor | None = None) -> None:
        """Add `weights[layer][h] * segments[b, j]` to head h's logit of key j; `weights[layer]` has one value per
        query head, `segments` [B, L] covers absolute key positions (keys past L get 0). None clears."""
        if weights is None:
            self.key_bias_weights, self.key_segments = {}, None
            return
        checked = {}
        for layer, weight in weights.items():
            layer = self.check_layer(layer, "key bias")
            if not isinstance(weight, torch.Tensor) or weight.shape != (self.num_heads[layer],):
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(
                    f"key bias for layer {layer} must be a tensor of shape [{self.num_heads[layer]}] (one weight per "
                    f"query head), got {shape}"
                )
            checked[layer] = weight
        if segments is not None and (not isinstance(segments, torch.Tensor) or segments.dim() != 2):
            raise ValueError("key bias segments must be a [batch, positions] tensor")
        self.key_bias_weights, self.key_segments = checked, segments

    # ---- the attention call ---------------------------------------------------------------------------------------

    def _wanted(self, layer: int) -> bool:
        return (
            layer in self.perturbations
            or (self.leaves is not None and layer in self._leaf_layers)
            or self.recorded is not None
            or any(p.layer == layer for p in self.probes.values())
            or (layer in self.key_bias_weights and self.key_segments is not None)
        )

    def _key_bias(self, call: AttentionCall) -> torch.Tensor | None:
        weight = self.key_bias_weights.get(call.layer)
        if weight is None or self.key_segments is None:
            return None
        batch, lk = call.query.shape[0], call.key.shape[2]
        segments = self.key_segments.to(call.query.device, torch.float32)
        if segments.shape[0] != batch:
            raise ValueError(f"key bias segments have {segments.shape[0]} rows but the batch has {batch}")
        start = call.key_offset
        window = torch.zeros(batch, lk, device=segments.device)
        stop = min(segments.shape[1], start + lk)
        if stop > start:
            window[:, : stop - start] = segments[:, start:stop]
        return weight.to(segments.device, torch.float32)[None, :, None, None] * window[:, None, None, :]

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        layer = call.layer
        if not self._wanted(layer):
            return None
        b, hq, lq, _ = call.query.shape
        shape = (b, hq, lq, call.key.shape[2])
        bias = self.perturbations.get(layer)
        if bias is not None:
            bias = bias.to(call.query.device)
        if self.leaves is not None and layer in self._leaf_layers:
            if layer in self.leaves:
                raise RuntimeError(f"layer {layer} ran twice inside perturbation_leaves(); use one forward per block")
            dtype = torch.promote_types(call.query.dtype, torch.float32)
            leaf = torch.zeros(shape, device=call.query.device, dtype=dtype, requires_grad=True)
            self.leaves[layer] = leaf
            bias = leaf if bias is None else bias + leaf
        key_bias = self._key_bias(call)
        if key_bias is not None:
            bias = key_bias if bias is None else bias + key_bias
        result = biased_attention(
            call.query, call.key, call.value, scale=call.scale, mask=call.mask, causal=call.causal,
            sliding_window=call.sliding_window, softcap=call.softcap, bias=bias, dropout=call.dropout,
            bias_name=f"perturbation for layer {layer}",
        )  # fmt: skip
        if self.recorded is not None:
            self.recorded[layer] = (result.logits.detach(), result.visible)
        for name, probe in self.probes.items():
            if probe.layer == layer:
                if not -lq <= probe.query < lq:
                    raise IndexError(
                        f"probe {name!r}: query {probe.query} is out of range for a call with {lq} queries "
                        f"(valid: {-lq}..{lq - 1})"
                    )
                self.probe_values[name] = result.probs[:, probe.head, probe.query, :]
        weights = result.probs.to(call.query.dtype) if call.output_attentions else None
        return result.out.transpose(1, 2).contiguous(), weights

    def reset(self) -> None:
        self.probe_values.clear()

    def describe(self) -> str:
        return f"adapter: layers {self.adapter_layers}, probes {sorted(self.probes)}"
