"""What every training adapter shares: it patches one transformers model with the `adapter` method, holds its own
trainable tensors (if any) as an nn.Module, saves as JSON + safetensors (never pickle) and detaches cleanly."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .._version import __version__
from ..api import Patch, apply
from ..methods.adapter import AdapterAttention

CONFIG_FILE = "attnpatch_adapter.json"
STATE_FILE = "attnpatch_adapter.safetensors"


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside `model` (a PEFT wrapper is looked through); a clear error otherwise."""
    from transformers import PreTrainedModel

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(
        f"an attention adapter needs the transformers model whose attention it reaches, got {type(model).__name__}; "
        "pass the PreTrainedModel (e.g. your classifier's encoder, or the PEFT model)"
    )


class AttentionAdapterBase(nn.Module):
    """Base of the adapters: `method` is the patched model's AdapterAttention; `detach()` removes the patch."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, model: nn.Module, config: Any, *, layers: Sequence[int] | None):
        super().__init__()
        self.config = config
        target = transformers_model(model)
        # not a submodule: the adapter's state_dict must hold only its own tensors
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "patch", apply(target, "adapter", layers=None if layers is None else list(layers)))

    @property
    def method(self) -> AdapterAttention:
        if not self.patch.active:
            raise RuntimeError(f"this {type(self).__name__} was detached; create a new one to train again")
        return self.patch.method

    def detach(self) -> None:
        """Remove the patch: the model runs its own attention again, bit-identical to before. Idempotent."""
        patch: Patch = self.patch
        patch.remove()

    def _config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def save(self, directory: str | Path) -> Path:
        """Write `attnpatch_adapter.json` (kind, config, version) and `attnpatch_adapter.safetensors` (tensors)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"adapter": self.kind, "attnpatch_version": __version__, "config": self._config_dict()}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(state, str(out / STATE_FILE))
        return out

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, **overrides: Any) -> AttentionAdapterBase:
        """Rebuild a saved adapter of this kind on `model` (config from the JSON, tensors from safetensors)."""
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}; save an adapter there with adapter.save(...)")
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("adapter") != cls.kind:
            raise ValueError(f"{path} holds a {meta.get('adapter')!r} adapter, not {cls.kind!r}")
        config = cls.config_class(**{**meta["config"], **overrides})
        adapter = cls(model, config)
        state = load_file(str(path / STATE_FILE)) if (path / STATE_FILE).is_file() else {}
        adapter.load_state_dict(state, strict=True)
        return adapter
