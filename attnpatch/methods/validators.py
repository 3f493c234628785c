"""Validators shared by the method configs and the tools that take layers and heads: every bad value names the option,
the value and what is allowed."""

from __future__ import annotations

import numbers
from typing import Any


def check_number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {kind} in [{lo}, {hi}], got {value!r} ({type(value).__name__})")
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_layer(option: str, layer: Any, num_layers: int) -> int:
    """`layer` as an int, refused unless it is an integer in 0..num_layers-1. A string of digits (a JSON object key,
    such as {"2": "all"} read from a file) is read as that integer."""
    if isinstance(layer, str) and layer.strip().isdigit():
        layer = int(layer)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"{option}: layer {layer!r} must be an integer, not {type(layer).__name__}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"{option}: layer {layer!r} is out of range; the model has layers 0..{num_layers - 1}")
    return int(layer)


def check_head(option: str, layer: int, head: Any, num_heads: int) -> int:
    """`head` as an int, refused unless it is an integer in 0..num_heads-1 (the heads of `layer`)."""
    if isinstance(head, bool) or not isinstance(head, numbers.Integral) or not 0 <= head < num_heads:
        raise ValueError(
            f"{option}[{layer}]: head {head!r} is out of range; layer {layer} has heads 0..{num_heads - 1}"
        )
    return int(head)


HeadSpec = dict[int, list[int]]


def resolve_heads(spec: Any, num_layers: int, num_heads: list[int], default_layers: range) -> HeadSpec:
    """Normalise a `heads` option to {layer: sorted head list}.

    Accepted: None (every head of `default_layers`), "all" (every head of every layer), or a dict
    {layer: [heads] | "all"}; layers and heads are 0-based and must exist in the model.
    """
    if spec is None:
        return {layer: list(range(num_heads[layer])) for layer in default_layers}
    if spec == "all":
        return {layer: list(range(num_heads[layer])) for layer in range(num_layers)}
    if not isinstance(spec, dict):
        raise ValueError(
            f"heads must be None, 'all' or a dict {{layer: [heads] | 'all'}}, got {spec!r} ({type(spec).__name__})"
        )
    if not spec:
        raise ValueError("heads={} selects no head, so nothing would be patched; pass None, 'all' or {layer: [heads]}")
    out: HeadSpec = {}
    for layer, heads in spec.items():
        layer = check_layer("heads", layer, num_layers)
        n = num_heads[layer]
        if heads == "all":
            heads = list(range(n))
        if isinstance(heads, numbers.Integral) and not isinstance(heads, bool):
            heads = [heads]
        if not isinstance(heads, (list, tuple, set, range)):
            raise ValueError(f"heads[{layer}] must be a list of head indices or 'all', got {heads!r}")
        if not heads:
            raise ValueError(f"heads[{layer}] is empty, so layer {layer} would not be patched; list its heads or 'all'")
        out[layer] = sorted({check_head("heads", layer, h, n) for h in heads})
    return out
