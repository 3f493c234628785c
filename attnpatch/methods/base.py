"""The contract between methods and integrations: what a method sees of one attention call and of one forward,
the Method base classes and their registry, and the small view of a Patch that an integration drives.

Methods never know the model family; integrations never know what a method computes. Both import this module and
nothing of each other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

# The transformers families of the tiny test models (tests/helpers/tiny_models.family_model) that a method reaching
# attention through the registry is checked on; see Method.families.
TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "bert")


class UnsupportedModelError(TypeError):
    """attnpatch cannot reach this model's attention (or the method cannot run on it); nothing was patched."""


@dataclass
class ForwardContext:
    """One forward of the patched backbone: tokens already in its KV cache, the 2-D padding mask, the kind of cache,
    the image positions among this forward's tokens (None when the model has no image token or the call gave no
    input_ids), how many tokens it adds (and, in a verification forward of assisted decoding, how many rows it
    verifies), the cache object itself, and `state`: the method's state of the sequence
    (from `Method.new_state` for a forward that starts one, else the one the cache carries). `masks` memoises this
    forward's 4-D masks as KeyRanges (kernels.masking.MaskMemo)."""

    past_length: int = 0
    attention_mask: torch.Tensor | None = None
    cache_kind: str = "none"
    image_mask: torch.Tensor | None = None
    new_tokens: int | None = None
    verified_rows: int | None = None  # assisted decoding verifies this many candidate rows (+1) in this forward
    cache: Any = None
    state: Any = None
    masks: dict = field(default_factory=dict)


@dataclass
class AttentionCall:
    """One call of a patched attention layer, as the integration hands it to a method.

    query [B, Hq, Lq, D]; key, value [B, Hkv, Lk, D] (keys already include the KV cache); mask: the base backend's
    4-D mask (bool, True = visible, or additive float) or None for the causal/sliding rule. `past_length` is the
    number of tokens the cache held before this call; this call's keys sit at absolute positions
    [key_offset, key_offset + Lk). `query_valid` [B, Lq] marks real (non-pad) query rows when known.
    `base` computes the unpatched attention for the same call (returns [B, Lq, Hq, D] and optional weights).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    causal: bool
    base: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    dropout: float = 0.0
    sliding_window: int | None = None
    softcap: float | None = None
    past_length: int = 0
    key_offset: int = 0
    query_valid: torch.Tensor | None = None
    output_attentions: bool = False
    cache_kind: str = "dynamic"  # "none", "dynamic" (keys in order), or "other" (static/offloaded/... caches)
    mask_memo: dict | None = None  # the forward's kernels.masking.MaskMemo (a 4-D mask is checked once per forward)
    state: Any = None  # the method's state of this call's sequence (ForwardContext.state)


class Method:
    """A named attention rule with a validated config. Per-sequence state never lives on the instance: a method that
    needs some returns a fresh object from `new_state`, the integration keeps it with the sequence's KV cache and hands
    it back in `ForwardContext.state` and `AttentionCall.state` (so any number of sequences, caches, copies of caches
    and threads can run through one patched model)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    integration: ClassVar[str] = "transformers"  # how attnpatch reaches the model: "transformers" or "module_forward"
    scope: ClassVar[str] = "model"  # "language": patch only the language model of a vision-language model
    reads_layer_inputs: ClassVar[bool] = False  # True: observe_layer_input gets each selected layer's residual stream
    # The contract every registered method passes (tests/methods/test_contract.py): with `neutral_options` it changes
    # no output of a tiny model of each of `families` (names of tests/helpers/tiny_models.family_model), remove()
    # restores the model bit for bit, a refused apply leaves it untouched, and a bad option names itself.
    families: ClassVar[tuple[str, ...]] = ()
    neutral_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Any, num_layers: int, num_heads: list[int]):
        self.config = config
        self.num_layers = num_layers
        self.num_heads = num_heads

    def layers(self) -> set[int]:
        """Layers whose calls must reach `attend` (others go straight to the base function)."""
        raise NotImplementedError

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Return (out [B, Lq, Hq, D], weights or None), or None to use the base function unchanged.

        With `call.output_attentions`, a method that changes the probabilities returns them as weights; weights None
        means "the unpatched probabilities", which the integration then computes the way eager attention would."""
        raise NotImplementedError

    def check_model(self, model_info: Any) -> None:
        """Refuse a model the method cannot run on (`model_info` is the integration: hidden_size, image_token_id)."""

    def new_state(self) -> Any:
        """The state of a new sequence (None: the method keeps none)."""
        return None

    def start_forward(self, context: ForwardContext) -> None:
        """A forward of the backbone begins: check (and, after `cache.crop`, cut back) `context.state` against the
        KV cache it continues, or raise an error that names what cannot be followed."""

    def observe_layer_input(self, layer: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        """The residual stream [B, L, hidden] entering decoder layer `layer` (only when `reads_layer_inputs`)."""

    def reset(self) -> None:
        """Nothing to forget: per-sequence state lives with each sequence's KV cache (kept for compatibility)."""

    def note_state(self, state: Any) -> None:
        """Note the state of the latest forward in this thread (for inspection: `last_state`)."""
        self._thread.state = state

    @property
    def last_state(self) -> Any:
        """The state of the sequence of the latest forward in this thread (None before any)."""
        return getattr(self._thread, "state", None)

    def latest(self, name: str) -> dict:
        """A copy of the dict field `name` of `last_state` ({} before any forward in this thread)."""
        state = self.last_state
        return dict(getattr(state, name)) if state is not None else {}

    @property
    def _thread(self) -> threading.local:
        local = self.__dict__.get("_thread_local")
        return local if local is not None else self.__dict__.setdefault("_thread_local", threading.local())

    def __getstate__(self) -> dict:
        """Copies and pickles carry the configuration, not what the latest forward of some thread left."""
        state = dict(self.__dict__)
        state.pop("_thread_local", None)
        return state

    def selected_heads(self) -> dict[int, list[int]]:
        """layer -> the heads the method changes there (default: every head of each selected layer)."""
        return {layer: list(range(self.num_heads[layer])) for layer in sorted(self.layers())}

    def describe(self) -> str:
        """The method and its options (those that select layers or heads are shown by Patch.describe)."""
        fields = getattr(self.config, "__dataclass_fields__", {})
        shown = [f"{k}={getattr(self.config, k)!r}" for k in fields if k not in ("heads", "layers")]
        return f"{self.name}({', '.join(shown)})"


def describe_selection(selected: dict[int, list[int]], num_heads: list[int]) -> str:
    """'3 heads in 2 layers: {1: [0, 2], 2: all}' (long selections are summarised)."""
    if not selected:
        return "no layers"
    count = sum(len(h) for h in selected.values())
    layers = sorted(selected)
    every = all(len(selected[layer]) == num_heads[layer] for layer in layers)
    if every and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        where = f"every head of layers {layers[0]}..{layers[-1]}"
    else:
        parts = [
            f"{layer}: {'all' if len(selected[layer]) == num_heads[layer] else selected[layer]}" for layer in layers
        ]
        where = "{" + ", ".join(parts[:8]) + (f", ... ({len(parts) - 8} more layers)" if len(parts) > 8 else "") + "}"
    return f"{count} head{'s' * (count != 1)} in {len(layers)} layer{'s' * (len(layers) != 1)}: {where}"


class ModuleMethod(Method):
    """A method that replaces the forward of whole modules, matched by type, one instance at a time (timm models and
    other modules outside the transformers registry). The integration checks every module with `check_module` before
    it changes any, then routes each patched module's calls to `module_forward`."""

    integration = "module_forward"

    @classmethod
    def targets(cls) -> tuple[type, ...]:
        """The module classes this method replaces (instances of subclasses are matched too, then checked)."""
        raise NotImplementedError

    @classmethod
    def check_module(cls, module: Any) -> None:
        """Raise TypeError when `module`'s forward is not the one this method was written for."""

    def module_forward(self, layer: int, module: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The patched forward of `module` (`original`: its own forward, bound)."""
        raise NotImplementedError

    def layers(self) -> set[int]:
        return set(range(self.num_layers))

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        raise TypeError(f"{self.name} replaces module forwards; it takes no attention-function calls")


class PatchView(Protocol):
    """What an integration needs of a Patch: its method, the layers it selects, and the key under which a KV cache
    keeps the method's state of its sequence (copies of the patch, with the patched model, share it)."""

    method: Method
    selected_layers: frozenset[int]
    key: str


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available to `attnpatch.apply` under `cls.name`."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__qualname__})")
    METHODS[cls.name] = cls
    return cls
