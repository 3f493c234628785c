"""head_mask: gate the output of chosen attention heads (head-importance analysis), weights untouched.

Each selected head's slice of the attention output [B, Lq, H, D] is multiplied by its gate before the output
projection: 1 keeps the head, 0 removes it (Michel et al., "Are Sixteen Heads Really Better than One?", 2019).
Gates may be one value per head ([H]) or one per batch element and head ([B, H]), so one forward over a repeated batch
can mask a different head in every copy; gates that require grad give d loss / d gate (the Taylor importance score).
An optional `observe` callback sees every attention call (q and k after position encoding, the mask rules), which the
analyses use to recompute attention maps block by block without changing any output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import TEXT_FAMILIES, AttentionCall, Method, register_method
from .validators import check_layer, resolve_heads


@dataclass(frozen=True, eq=False)
class HeadMaskConfig:
    """Options of `attnpatch.apply(model, "head_mask", ...)`.

    gates: {layer: gate values [H] or [B, H]} (tensor or nested list; 1 = keep, 0 = remove; any real value scales).
    heads: {layer: [heads] | "all"} to remove (gate 0), a shorthand that combines with `gates` (applied on top).
    observe: a callable taking each `AttentionCall` of every layer before it runs (read-only; its return is ignored).
    """

    gates: Mapping[int, Any] | None = None
    heads: Mapping[int, Any] | None = None
    observe: Callable[[AttentionCall], Any] | None = None

    def __post_init__(self) -> None:
        for name in ("gates", "heads"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a dict {{layer: ...}} or None, got {type(value).__name__}")
        if self.observe is not None and not callable(self.observe):
            raise ValueError(f"observe must be callable, got {type(self.observe).__name__}")


def _gate_tensor(layer: int, value: Any, heads: int) -> torch.Tensor:
    """`value` as a float tensor [H] or [B, H]; a tensor that requires grad is kept as is (its gradient flows)."""
    gate = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float32)
    if not gate.is_floating_point():
        gate = gate.float()
    if gate.dim() not in (1, 2) or gate.shape[-1] != heads:
        raise ValueError(
            f"gates[{layer}] must have shape [{heads}] or [batch, {heads}] (layer {layer} has {heads} heads), "
            f"got {tuple(gate.shape)}"
        )
    if not bool(torch.isfinite(gate.detach()).all()):
        raise ValueError(f"gates[{layer}] has non-finite values")
    return gate


def resolve_gates(
    gates: Mapping[int, Any] | None, heads: Mapping[int, Any] | None, num_layers: int, num_heads: list[int]
) -> dict[int, torch.Tensor]:
    """{layer: gate tensor} from the `gates` and `heads` options, checked against the model's layers and heads."""
    out: dict[int, torch.Tensor] = {}
    for layer, value in (gates or {}).items():
        layer = check_layer("gates", layer, num_layers)
        out[layer] = _gate_tensor(layer, value, num_heads[layer])
    removed = resolve_heads(dict(heads), num_layers, num_heads, range(0)) if heads else {}
    for layer, index in removed.items():
        keep = torch.ones(num_heads[layer])
        keep[index] = 0.0
        out[layer] = out[layer] * keep.to(out[layer].device) if layer in out else keep
    return out


@register_method
class HeadMask(Method):
    name = "head_mask"
    families = TEXT_FAMILIES
    neutral_options = {"gates": {1: [1.0, 1.0, 1.0, 1.0]}}  # every head of layer 1 kept whole (the tiny models have 4)
    config_class = HeadMaskConfig

    def __init__(self, config: HeadMaskConfig, num_layers: int, num_heads: list[int]):
        super().__init__(config, num_layers, num_heads)
        self.gates: dict[int, torch.Tensor] = resolve_gates(config.gates, config.heads, num_layers, num_heads)

    def set_gates(self, gates: Mapping[int, Any] | None = None, heads: Mapping[int, Any] | None = None) -> None:
        """Replace every gate (same forms as the options); layers left out run unchanged."""
        self.gates = resolve_gates(gates, heads, self.num_layers, self.num_heads)

    def layers(self) -> set[int]:
        return set(range(self.num_layers))  # gates can change after apply (set_gates); unset layers cost one lookup

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.config.observe is not None:
            self.config.observe(call)
        gate = self.gates.get(call.layer)
        if gate is None:
            return None
        out, weights = call.base()
        batch = out.shape[0]
        if gate.dim() == 2 and gate.shape[0] != batch:
            raise ValueError(
                f"attnpatch head_mask: gates[{call.layer}] has {gate.shape[0]} rows but the batch has {batch}; "
                "per-batch gates need one row per sequence"
            )
        gate = gate.to(device=out.device, dtype=out.dtype)
        gate = gate[None, None, :, None] if gate.dim() == 1 else gate[:, None, :, None]
        return out * gate, weights

    def selected_heads(self) -> dict[int, list[int]]:
        return {layer: list(range(self.num_heads[layer])) for layer in sorted(self.gates)}

    def describe(self) -> str:
        parts = []
        for layer, gate in sorted(self.gates.items()):
            removed = (gate.detach() == 0).all(dim=0) if gate.dim() == 2 else gate.detach() == 0
            shape = "per-batch " if gate.dim() == 2 else ""
            parts.append(f"{layer}: {shape}gates, removed {removed.nonzero().flatten().tolist()}")
        observe = ", observed" if self.config.observe is not None else ""
        return f"head_mask: {{{'; '.join(parts)}}}{observe}"
