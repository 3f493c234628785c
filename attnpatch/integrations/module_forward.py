"""How attnpatch reaches modules outside the transformers registry (timm, remote code): instance-level forward
replacement.

The method names the module classes it replaces. Every instance of them in the model is found and checked
(`check_module`: its forward is the one the method was written for) before any is changed; `attach` then sets an
instance attribute `forward` on each (the class is never touched, so other models are unaffected), and `detach`
deletes it, after which the class's own forward runs again and outputs are bit-identical to before the patch.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..methods.base import ModuleMethod, PatchView, UnsupportedModelError

_BINDING = "_attnpatch_binding"


class ModuleForwardIntegration:
    """Attach a Patch by replacing the forward of every target module of `model`; `detach` undoes every change."""

    def __init__(self, model: nn.Module, method_cls: type[ModuleMethod]):
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"attnpatch needs a torch.nn.Module, got {type(model).__name__}")
        targets = method_cls.targets()
        self.model = model
        self.modules: list[nn.Module] = [m for m in model.modules() if isinstance(m, targets)]
        if not self.modules:
            names = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in targets)
            raise UnsupportedModelError(
                f"attnpatch {method_cls.name} cannot patch {type(model).__name__}: it has no {names} module"
            )
        for module in self.modules:
            if "forward" in module.__dict__ or _BINDING in module.__dict__:
                raise UnsupportedModelError(
                    f"attnpatch {method_cls.name}: the forward of a {type(module).__name__} in "
                    f"{type(model).__name__} is already replaced on the instance (another patch or wrapper); "
                    "remove that first"
                )
            method_cls.check_module(module)
        self._patched: list[nn.Module] = []

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    @property
    def num_heads(self) -> list[int]:
        return [int(getattr(m, "num_heads", 0)) for m in self.modules]

    def attach(self, patch: PatchView) -> None:
        try:
            for layer, module in enumerate(self.modules):
                module.__dict__[_BINDING] = Binding(patch, layer)
                module.__dict__["forward"] = types.MethodType(_patched_forward(type(module).forward), module)
                self._patched.append(module)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_BINDING, None)
        self._patched.clear()


@dataclass
class Binding:
    patch: PatchView
    layer: int


def _patched_forward(class_forward: Callable[..., Any]) -> Callable[..., Any]:
    """The instance forward: hands the call to the bound Patch's method (with the class's forward as `original`).

    It finds its Patch through the module, not a closure, so a deep copy of a patched model calls its own modules."""

    @functools.wraps(class_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        binding: Binding = self.__dict__[_BINDING]
        original = class_forward.__get__(self)
        return binding.patch.method.module_forward(binding.layer, self, original, *args, **kwargs)

    return forward
