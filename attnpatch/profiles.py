"""Calibration profiles: what `calibrate` found, saved as JSON + safetensors and checked against the model on load.

A profile directory holds `attnpatch_config.json` (format version, method, method options, selected heads, the model
fingerprint, free-form metadata such as tasks, scores and timings) and `attnpatch_state.safetensors` (tensors, e.g.
the per-head score table). Loading never unpickles anything, validates the schema, and `check(model)` refuses a
model whose fingerprint differs, naming each difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._version import __version__

CONFIG_NAME = "attnpatch_config.json"
STATE_NAME = "attnpatch_state.safetensors"
FORMAT_VERSION = 1
# fingerprint keys that must match for a profile to apply; the others are informational
MATCHED_KEYS = ("architecture", "model_type", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "weights")


class ProfileError(ValueError):
    """A profile file is missing, corrupt, or does not belong to this model or method."""


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _weights_digest(model: nn.Module, tensors: int = 4, elements: int = 4096) -> str:
    """sha256 over the first `elements` values of the first and last few parameters (in float32)."""
    params = [p for _, p in model.named_parameters()]
    picked = params[:tensors] + params[-tensors:] if len(params) > 2 * tensors else params
    digest = hashlib.sha256()
    for p in picked:
        digest.update(str(tuple(p.shape)).encode())
        digest.update(p.detach().flatten()[:elements].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture, sizes and a digest of a few weights: enough to tell one checkpoint from another."""
    import transformers

    config = _text_config(model)
    architectures = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    heads = getattr(config, "num_attention_heads", None)
    return {
        "architecture": architectures[0],
        "model_type": getattr(config, "model_type", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", heads),
        "hidden_size": getattr(config, "hidden_size", None),
        "weights": _weights_digest(model),
        "attnpatch": __version__,
        "transformers": transformers.__version__,
    }


def _json_heads(heads: dict[int, list[int]]) -> dict[str, list[int]]:
    return {str(layer): [int(h) for h in hs] for layer, hs in sorted(heads.items())}


@dataclass
class Profile:
    """Result of a calibration: a method, its options and the selected (layer, head) pairs for one model."""

    method: str
    options: dict[str, Any]
    heads: dict[int, list[int]]
    fingerprint: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def apply_options(self) -> dict[str, Any]:
        """Options for `attnpatch.apply(model, self.method, **options)` (with the heads, for methods that take them)."""
        import dataclasses

        from .methods.base import METHODS

        config_class = METHODS.get(self.method).config_class if self.method in METHODS else None
        if config_class is not None and "heads" not in {f.name for f in dataclasses.fields(config_class)}:
            return dict(self.options)
        return {**self.options, "heads": {layer: list(hs) for layer, hs in self.heads.items()}}

    def save(self, directory: str | os.PathLike) -> str:
        """Write the profile into `directory` (created if needed); returns the directory."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "options": self.options,
            "heads": _json_heads(self.heads),
            "fingerprint": self.fingerprint,
            "metadata": self.metadata,
        }
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1, sort_keys=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors.items()}
        save_file(tensors, os.path.join(directory, STATE_NAME), metadata={"format_version": str(FORMAT_VERSION)})
        return str(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Profile:
        """Read a profile directory (JSON + safetensors); raises ProfileError saying what is wrong."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ProfileError(f"no profile at {directory}: {CONFIG_NAME} is missing (save one with Profile.save)")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProfileError(f"corrupt profile {path}: {e}") from e
        _validate(config, path)
        tensors: dict[str, torch.Tensor] = {}
        state = os.path.join(directory, STATE_NAME)
        if os.path.isfile(state):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(state)
            except (SafetensorError, OSError, ValueError) as e:
                raise ProfileError(f"corrupt profile tensors {state}: {e}") from e
        heads = {int(layer): [int(h) for h in hs] for layer, hs in config["heads"].items()}
        return cls(
            method=config["method"],
            options=config["options"],
            heads=heads,
            fingerprint=config["fingerprint"],
            metadata=config.get("metadata", {}),
            tensors=tensors,
        )

    def differences(self, model: nn.Module) -> list[str]:
        """What differs between the model this profile was made for and `model` ([] when it matches)."""
        current = fingerprint(model)
        return [
            f"{key}: profile {self.fingerprint.get(key)!r}, model {current.get(key)!r}"
            for key in MATCHED_KEYS
            if self.fingerprint.get(key) != current.get(key)
        ]

    def check(self, model: nn.Module, method: str | None = None) -> None:
        """Raise ProfileError unless this profile was made for `model` (and `method`, when given)."""
        if method is not None and method != self.method:
            raise ProfileError(f"the profile is for method {self.method!r}, not {method!r}")
        diff = self.differences(model)
        if diff:
            raise ProfileError(
                "the profile was calibrated on a different model (" + "; ".join(diff) + "); calibrate this model "
                "with attnpatch.calibrate(...) or pass the matching profile"
            )


def _validate(config: Any, path: str) -> None:
    problems = []
    if not isinstance(config, dict):
        raise ProfileError(f"corrupt profile {path}: expected a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {config.get('format_version')!r} (this attnpatch reads {FORMAT_VERSION})")
    if not isinstance(config.get("method"), str):
        problems.append("method must be a string")
    if not isinstance(config.get("options"), dict):
        problems.append("options must be an object")
    if not isinstance(config.get("fingerprint"), dict):
        problems.append("fingerprint must be an object")
    heads = config.get("heads")
    if not isinstance(heads, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, list) and all(isinstance(h, int) for h in v)
        for k, v in heads.items()
    ):
        problems.append("heads must map layer numbers to lists of head numbers")
    if problems:
        raise ProfileError(f"invalid profile {path}: " + "; ".join(problems))


def resolve(profile: Profile | str | os.PathLike, model: nn.Module, method: str) -> Profile:
    """A Profile (loaded from a directory when given a path) checked against `model` and `method`."""
    if not isinstance(profile, (Profile, str, os.PathLike)):
        raise TypeError(
            f"profile must be a Profile or the path of a directory written by Profile.save, got "
            f"{type(profile).__name__} {profile!r}"
        )
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    profile.check(model, method)
    return profile
