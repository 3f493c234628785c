"""The configurations an A/B evaluation compares: None (unpatched), {"method": name, **options}, or a calibrated
Profile; shared by the task runner (`runner`) and the OCW runner (`ocw.runner`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from ..api import patched
from ..profiles import Profile

Config = Mapping[str, Any] | Profile | None


def describe(config: Config) -> Any:
    """A JSON-able description of `config` for a report."""
    if config is None:
        return "unpatched"
    if isinstance(config, Profile):
        return {"method": config.method, "profile_heads": config.num_heads, **config.options}
    return dict(config)


def patch_context(model, config: Config) -> AbstractContextManager:
    """A context that applies `config`'s patch to `model` and removes it on exit (nothing for None)."""
    if config is None:
        return contextlib.nullcontext()
    if isinstance(config, Profile):
        return patched(model, config.method, profile=config)
    options = dict(config)
    return patched(model, options.pop("method"), **options)
