"""Public API: apply(), patched(), remove(), available_methods(), and the Patch handle."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from torch import nn

from .integrations.module_forward import ModuleForwardIntegration
from .integrations.structure import unwrap
from .integrations.transformers import TransformersIntegration
from .methods.base import METHODS, Method, UnsupportedModelError, describe_selection

_PATCH = "_attnpatch_patch"
T = TypeVar("T")
logger = logging.getLogger("attnpatch")


class Integration(Protocol):
    """How a Patch reaches a model's attention (integrations/): built and checked before anything changes."""

    num_layers: int
    num_heads: list[int]

    def attach(self, patch: Patch) -> None: ...

    def detach(self) -> None: ...


def _make_integration(method_cls: type[Method], model: nn.Module) -> Integration:
    """The integration `method_cls.integration` names, for `model`."""
    if method_cls.integration == "transformers":
        return TransformersIntegration(model, scope=method_cls.scope)
    if method_cls.integration == "module_forward":
        return ModuleForwardIntegration(model, method_cls)
    raise ValueError(f"method {method_cls.name!r} names an unknown integration {method_cls.integration!r}")


class Patch:
    """An active patch on one model. State (per-sequence statistics) lives here, never on classes or in globals."""

    def __init__(self, model: nn.Module, method: Method, integration: Integration):
        self.model = model
        self.method = method
        self.integration = integration
        self.selected_layers = frozenset(method.layers())
        self.key = f"{method.name}:{uuid.uuid4().hex}"  # a KV cache keeps this patch's sequence state under it
        self.active = False

    @property
    def config(self) -> Any:
        return self.method.config

    def _attach(self) -> None:
        self.integration.attach(self)
        unwrap(self.model).__dict__[_PATCH] = self
        self.active = True

    def remove(self) -> None:
        """Restore the model's own attention; outputs are then bit-identical to before `apply`. Idempotent."""
        if not self.active:
            return
        self.integration.detach()
        unwrap(self.model).__dict__.pop(_PATCH, None)
        self.active = False

    def reset(self) -> None:
        """Does nothing, kept for compatibility: per-sequence state lives with each KV cache (a new cache, or a call
        without one, starts a new sequence)."""

    def describe(self) -> str:
        """What is patched: model, method with its options, the layers and heads it changes, active or removed."""
        selection = describe_selection(self.method.selected_heads(), self.method.num_heads)
        state = "active" if self.active else "removed"
        return f"{type(self.model).__name__} <- {self.method.describe()} on {selection}; {state}"

    def __repr__(self) -> str:
        return f"Patch({self.describe()})"

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def available_methods() -> list[str]:
    """Names accepted by `apply`."""
    return sorted(METHODS)


def get_patch(model: nn.Module) -> Patch | None:
    """The active Patch of `model` (or of the model inside a PEFT wrapper), if any."""
    try:
        model = unwrap(model)
    except UnsupportedModelError:
        model = model._orig_mod  # a compiled module: the patch, if any, is on the model it compiled
    return model.__dict__.get(_PATCH)


def _make_config(method: str, options: dict[str, Any]) -> Any:
    cls = METHODS[method].config_class
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(names)}")
    return cls(**options)


def apply(model: nn.Module, method: str, **options: Any) -> Patch:
    """Patch `model`'s attention with `method` ("act", "var", "outlook", ...) and return the Patch; `patch.remove()`
    undoes it.

    `profile=` (a Profile or a directory written by `Profile.save`) supplies the calibrated heads and options; it is
    refused when made for another model or method. Options given explicitly override the profile's.

    A model carries at most one patch: applying again raises until the first one is removed (`attnpatch.remove`).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available methods: {available_methods()}")
    target = unwrap(model)  # a PEFT model's base model; a compiled module is refused
    existing = get_patch(target)
    if existing is not None:
        raise RuntimeError(
            f"{type(model).__name__} is already patched ({existing.method.name}); call patch.remove() or "
            "attnpatch.remove(model) first, or use `with attnpatch.patched(model, ...)`"
        )
    profile = options.pop("profile", None)
    if profile is not None:
        from .profiles import resolve

        options = {**resolve(profile, target, method).apply_options(), **options}
    config = _make_config(method, options)
    integration = _make_integration(METHODS[method], target)
    method_obj = METHODS[method](config, integration.num_layers, integration.num_heads)
    method_obj.check_model(integration)
    patch = Patch(model, method_obj, integration)
    patch._attach()
    return patch


def remove(model: nn.Module) -> bool:
    """Remove the active patch of `model`; returns False when there was none."""
    patch = get_patch(model)
    if patch is None:
        return False
    patch.remove()
    return True


@contextlib.contextmanager
def unpatched(model: nn.Module) -> Iterator[Patch | None]:
    """Within the block `model` runs with no patch: its active patch (yielded, or None) is removed and put back on
    exit, with its configuration, its key and so the state its KV caches keep. Evaluation, calibration and analysis
    run their configurations inside this, so a baseline called "unpatched" is unpatched."""
    patch = get_patch(model)
    if patch is None:
        yield None
        return
    logger.info("attnpatch: %s is set aside for this run and restored after it", patch.describe())
    patch.remove()
    try:
        yield patch
    finally:
        patch._attach()


def runs_unpatched(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a workflow `fn(model, ...)` that applies patches of its own: it runs inside `unpatched(model)`."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> T:
        with unpatched(model):
            return fn(model, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def patched(model: nn.Module, method: str, **options: Any) -> Iterator[Patch]:
    """`with attnpatch.patched(model, "act", beta=0.4) as patch:` ... the model is restored on exit."""
    patch = apply(model, method, **options)
    try:
        yield patch
    finally:
        patch.remove()
