"""The configurations an A/B evaluation compares: None (unpatched), {"method": name, **options}, or a calibrated
Profile; shared by the task runner (`runner`) and the OCW runner (`ocw.runner`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from ..api import patched, unpatched
from ..profiles import Profile

Config = Mapping[str, Any] | Profile | None


def describe(config: Config) -> Any:
    """A JSON-able description of `config` for a report."""
    if config is None:
        return "unpatched"
    if isinstance(config, Profile):
        return {"method": config.method, "profile_heads": config.num_heads, **config.options}
    return dict(config)


def fingerprint(config: Config) -> str:
    """A JSON string that tells configurations apart (a profile by its method, options and every head), for
    matching saved results to the configuration that made them."""
    if isinstance(config, Profile):
        heads = {str(layer): sorted(hs) for layer, hs in sorted(config.heads.items())}
        data: Any = {"method": config.method, "heads": heads, **config.options}
    else:
        data = describe(config)
    return json.dumps(data, sort_keys=True, default=str)


@contextlib.contextmanager
def patch_context(model, config: Config) -> Iterator[None]:
    """A context in which `model` runs `config` alone: a patch already on the model is set aside (and restored on
    exit), then `config`'s patch is applied (nothing for None) and removed on exit."""
    with unpatched(model):
        if config is None:
            yield
        elif isinstance(config, Profile):
            with patched(model, config.method, profile=config):
                yield
        else:
            options = dict(config)
            with patched(model, options.pop("method"), **options):
                yield
