"""Where the tests run the Triton kernels: on the GPU when there is one, else in Triton's CPU interpreter (the root
conftest sets TRITON_INTERPRET=1 without CUDA). Inputs are drawn on the CPU (same seeds, same values everywhere) and
moved with `on_triton_device`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def moved(x: Any, device: torch.device | str) -> Any:
    """`x` on `device`: a tensor, a dataclass of tensors (KeyRanges, ColumnStats), a tuple, list or dict of them,
    or anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(
            x, **{f.name: moved(getattr(x, f.name), device) for f in dataclasses.fields(x) if f.init}
        )
    if isinstance(x, (tuple, list)):
        return type(x)(moved(y, device) for y in x)
    if isinstance(x, dict):
        return {key: moved(y, device) for key, y in x.items()}
    return x


def on_device(device: torch.device | str, *xs: Any) -> Any:
    """The arguments moved to `device` (one value for one argument, else a tuple)."""
    out = tuple(moved(x, device) for x in xs)
    return out[0] if len(out) == 1 else out


def on_triton_device(*xs: Any) -> Any:
    """The arguments moved to TRITON_DEVICE (one value for one argument, else a tuple)."""
    return on_device(TRITON_DEVICE, *xs)
