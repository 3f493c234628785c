"""outlook: run timm VOLO's `OutlookAttention` through one fused op (Yuan et al., "VOLO", TPAMI 2022).

`attnpatch.apply(volo, "outlook")` replaces the forward of every `timm.models.volo.OutlookAttention` instance with
the same computation, unfold -> softmax over the K*K sources -> AV -> fold, done by
`attnpatch.kernels.outlook.outlook_attention` (a Triton kernel on CUDA that never builds the unfold tensor or the
attention matrix; the PyTorch path elsewhere). The module's own layers (`v`, `attn`, `proj`, pooling, dropouts) are
still called, so LoRA or quantised layers keep working. Nothing is learned or calibrated: outputs equal timm's up to
floating-point rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..nn import fused_outlook_forward
from .base import ModuleMethod, UnsupportedModelError, register_method

# what timm's forward must contain for this replacement to compute the same thing
_TIMM_FORWARD_MARKERS = ("self.unfold(", "self.pool(", "self.attn(", "softmax(dim=-1)", "F.fold(", "self.proj(")


@dataclass(frozen=True)
class OutlookConfig:
    """Options of `attnpatch.apply(model, "outlook")`: none (the fused op computes timm's operator as it is)."""


def _timm_outlook_class() -> type:
    try:
        from timm.models.volo import OutlookAttention
    except ImportError as exc:
        raise UnsupportedModelError(
            f"attnpatch outlook patches timm VOLO models, but timm cannot be imported ({exc}); "
            "install it with `pip install 'attnpatch[timm]'` (timm needs a torchvision that matches torch)"
        ) from exc
    return OutlookAttention


@register_method
class Outlook(ModuleMethod):
    name = "outlook"
    families = ("volo",)
    neutral_options = {}  # the fused op computes timm's operator as it is
    config_class = OutlookConfig

    @classmethod
    def targets(cls) -> tuple[type, ...]:
        return (_timm_outlook_class(),)

    @classmethod
    def check_module(cls, module: Any) -> None:
        base = _timm_outlook_class()
        where = f"attnpatch outlook: {type(module).__module__}.{type(module).__qualname__}"
        if type(module).forward is not base.forward:
            raise UnsupportedModelError(
                f"{where} overrides OutlookAttention.forward; the fused forward was written for timm's own, so this "
                "module is left alone (nothing was patched)"
            )
        params = list(inspect.signature(base.forward).parameters)
        try:
            source = inspect.getsource(base.forward)
        except (OSError, TypeError):
            source = None
        if params != ["self", "x"] or (source is not None and not all(m in source for m in _TIMM_FORWARD_MARKERS)):
            raise UnsupportedModelError(
                f"{where}: this timm version's OutlookAttention.forward{inspect.signature(base.forward)} is not the "
                "unfold/softmax/fold forward attnpatch was written for (nothing was patched)"
            )
        _check_parts(module, where)

    def module_forward(self, layer: int, module: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fused_outlook_forward(module, *args, **kwargs)


def _check_parts(module: Any, where: str) -> None:
    """The attributes the fused forward reads, with the values timm's constructor gives them."""
    for name in ("v", "attn", "proj", "proj_drop", "attn_drop", "pool"):
        if not callable(getattr(module, name, None)):
            raise UnsupportedModelError(f"{where} has no callable `{name}` (nothing was patched)")
    for name in ("num_heads", "kernel_size", "padding", "stride"):
        value = getattr(module, name, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnsupportedModelError(f"{where}: `{name}` is {value!r}, expected an int (nothing was patched)")
    if not isinstance(getattr(module, "scale", None), (int, float)):
        raise UnsupportedModelError(f"{where}: `scale` is {getattr(module, 'scale', None)!r} (nothing was patched)")
    pool, s = module.pool, module.stride
    if not (
        isinstance(pool, nn.AvgPool2d)
        and pool.kernel_size in (s, (s, s))
        and pool.stride in (s, (s, s))
        and pool.padding in (0, (0, 0))
        and pool.ceil_mode
    ):
        raise UnsupportedModelError(
            f"{where}: `pool` is {pool!r}, expected AvgPool2d(kernel_size={s}, stride={s}, ceil_mode=True) "
            "(nothing was patched)"
        )
    if not isinstance(module.attn_drop, (nn.Dropout, nn.Identity)):
        raise UnsupportedModelError(
            f"{where}: `attn_drop` is {module.attn_drop!r}, expected nn.Dropout (nothing was patched)"
        )
