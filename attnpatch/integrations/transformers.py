"""How attnpatch reaches the attention of a transformers model: the AttentionInterface registry.

apply: remember the model's attention implementation (the base), register one dispatch function per base under
`attnpatch_<base>` in AttentionInterface together with the base's own mask function in AttentionMaskInterface (without
it, transformers hands the function attention_mask=None and padded batches go silently wrong), bind each attention
module to its Patch, and switch the model to that name. Layers a method does not select go to the captured base
function untouched. A forward pre-hook on the backbone records what a call cannot see on its own: how many tokens
the KV cache held before this forward and the 2-D padding mask. remove: switch back, drop hooks and bindings.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels import reference
from ..methods.base import AttentionCall, ForwardContext, PatchView, UnsupportedModelError
from .cache_names import output_cache
from .structure import (
    attention_modules,
    decoder_layers,
    image_positions,
    image_token_id,
    language_model,
    layer_input,
    num_query_heads,
)

# torch.compile: the hooks and a selected layer's method run outside compiled graphs (methods pick keys from the
# attention values, so their shapes depend on data); the rest of the model, unselected layers included, compiles.
OUTSIDE_GRAPHS = (
    "attnpatch runs a patched layer's method and its forward hooks outside torch.compile graphs (their shapes depend "
    "on the attention values): torch.compile(model) compiles the rest of the model around them; "
    "fullgraph=True cannot hold them, so compile without fullgraph=True"
)


def _outside_graphs(fn: Callable) -> Callable:
    return torch.compiler.disable(fn, reason=OUTSIDE_GRAPHS)


NAME_PREFIX = "attnpatch_"
STATES = "_attnpatch_states"  # attribute of a KV cache object: {patch key: its method's state of that sequence}
SUPPORTED_BASES = ("sdpa", "eager")
_BINDING = "_attnpatch_binding"


def _unsupported(model: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"attnpatch cannot patch {type(model).__name__}: {why}. Supported: transformers PreTrainedModel classes "
        "whose attention dispatches through AttentionInterface (Llama, Mistral, Qwen2, Qwen3, Gemma 3, BERT and "
        "most decoder/encoder families of transformers >= 4.56), loaded with attn_implementation 'sdpa' or 'eager'."
    )


def _base_function(module: nn.Module, base: str) -> Callable:
    """The attention function the model would call with implementation `base`."""
    if base == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(
                f"attnpatch cannot find the eager attention function of {type(module).__name__}; load the model with "
                "attn_implementation='sdpa'"
            )
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


@dataclass
class Binding:
    patch: PatchView
    layer: int
    base_fn: Callable
    integration: TransformersIntegration


def _make_dispatch(base_name: str) -> Callable:
    """The function registered as `attnpatch_<base>`: route one attention call to its Patch's method."""

    def attnpatch_attention(module, query, key, value, attention_mask, **kwargs):
        binding: Binding | None = module.__dict__.get(_BINDING)
        if binding is None:  # a module switched to our name without a patch: behave like the base
            return _base_function(module, base_name)(module, query, key, value, attention_mask, **kwargs)

        # the maps are attnpatch's to return (below): the base is not asked for them (sdpa would only warn)
        base_kwargs = {k: v for k, v in kwargs.items() if k != "output_attentions"}

        def base():
            return binding.base_fn(module, query, key, value, attention_mask, **base_kwargs)

        if binding.layer not in binding.patch.selected_layers:
            out, weights = base()
        else:
            out, weights = _run_method(binding, module, query, key, value, attention_mask, kwargs, base)
        if weights is None and kwargs.get("output_attentions"):
            weights = _unpatched_maps(module, query, key, attention_mask, kwargs)
        return out, weights

    return attnpatch_attention


@_outside_graphs
def _run_method(binding, module, query, key, value, attention_mask, kwargs, base):
    """The selected layer's call through its method: (out, weights)."""
    call = _make_call(binding, module, query, key, value, attention_mask, kwargs, base)
    result = binding.patch.method.attend(call)
    return base() if result is None else result


def _scale_and_causality(module: nn.Module, query: torch.Tensor, kwargs: dict) -> tuple[float, bool]:
    """The softmax scale (the module's `scaling`, else 1/sqrt(head dim)) and whether the call is causal."""
    scale = kwargs.get("scaling")
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    return scale, bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))


def _unpatched_maps(module: nn.Module, query, key, mask, kwargs) -> torch.Tensor:
    """The attention probabilities [B, Hq, Lq, Lk] eager attention would return for this call, in the query's dtype.

    `output_attentions=True` gets one map per layer on every base: the `sdpa` base returns none, so the layers it runs
    (and methods that leave the probabilities as they are) get them computed here."""
    scale, causal = _scale_and_causality(module, query, kwargs)
    probs = reference.attention_probs(
        query,
        key,
        scale=scale,
        mask=mask,
        causal=causal,
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
    )
    return probs.to(query.dtype)


def _make_call(binding, module, query, key, value, mask, kwargs, base) -> AttentionCall:
    ctx = binding.integration.current()
    if ctx is None:
        raise RuntimeError(
            f"attnpatch {binding.patch.method.name}: layer {binding.layer}'s attention ran outside a forward of the "
            "patched model's backbone (the patch learns the KV cache and padding from that forward); call the model"
        )
    batch, _, lq, _ = query.shape
    lk = key.shape[2]
    past = ctx.past_length
    key_offset = past + lq - lk if lk <= past + lq else 0
    query_valid = None
    pad = ctx.attention_mask
    if pad is not None and pad.dim() == 2 and pad.shape == (batch, past + lq):
        query_valid = pad[:, past:].to(device=query.device, dtype=torch.bool)
    scale, causal = _scale_and_causality(module, query, kwargs)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attnpatch: learned attention-sink logits (s_aux, gpt-oss) are not supported yet")
    return AttentionCall(
        layer=binding.layer,
        query=query,
        key=key,
        value=value,
        mask=mask,
        scale=scale,
        causal=causal,
        base=base,
        dropout=float(kwargs.get("dropout", 0.0) or 0.0),
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
        past_length=past,
        key_offset=key_offset,
        query_valid=query_valid,
        output_attentions=bool(kwargs.get("output_attentions", False)),
        cache_kind=ctx.cache_kind if past > 0 else "none",
        mask_memo=ctx.masks,
        state=ctx.state,
    )


def _cache_kind(cache: Any) -> str:
    if cache is None:
        return "none"
    from transformers.cache_utils import DynamicCache

    inner = getattr(cache, "self_attention_cache", cache)
    return "dynamic" if isinstance(inner, DynamicCache) else "other"


class TransformersIntegration:
    """Attach a Patch to a transformers model through the attention registry; `detach` undoes every change."""

    def __init__(self, model: nn.Module, scope: str = "model"):
        try:
            from transformers import PreTrainedModel
        except ImportError as exc:  # pragma: no cover - transformers is a core dependency
            raise _unsupported(model, "transformers is not installed") from exc
        if not isinstance(model, PreTrainedModel):
            raise _unsupported(model, "it is not a transformers PreTrainedModel")
        if scope not in ("model", "language"):
            raise ValueError(f"scope must be 'model' or 'language', got {scope!r}")
        self.model = model
        self.scope = scope
        self.root = language_model(model) if scope == "language" else model
        self.image_token_id = image_token_id(model)
        self.modules = attention_modules(self.root)
        if not self.modules:
            raise _unsupported(model, "none of its modules calls the AttentionInterface")
        if hasattr(type(model), "_can_set_attn_implementation") and not model._can_set_attn_implementation():
            raise _unsupported(model, "its class does not allow switching the attention implementation")
        self.configs = self._configs_of_modules()
        bases = {cfg._attn_implementation for cfg in self.configs}
        unsupported = bases - set(SUPPORTED_BASES)
        if unsupported:
            raise _unsupported(
                model,
                f"it runs attention implementation {sorted(unsupported)}; call "
                "model.set_attn_implementation('sdpa') first",
            )
        self.base_by_config = {id(cfg): cfg._attn_implementation for cfg in self.configs}
        self._handles: list[Any] = []
        self._patch: PatchView | None = None
        self._local = threading.local()  # this thread's stack of the forwards running now

    def __getstate__(self) -> dict:
        """Copies and pickles carry everything but the threads' forward stacks (a copy starts with none)."""
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        if self._patch is not None:  # unpickled in another process: its registry does not know our names yet
            self._register()

    def current(self) -> ForwardContext | None:
        """The context of the innermost forward of the patched backbone running in this thread, if any."""
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    @property
    def num_heads(self) -> list[int]:
        return [num_query_heads(module) for _, module in self.modules]

    @property
    def hidden_size(self) -> int | None:
        config = getattr(self.model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(config, "hidden_size", None)

    def _configs_of_modules(self) -> list[Any]:
        configs: dict[int, Any] = {}
        for _, module in self.modules:
            cfg = getattr(module, "config", None) or self.model.config
            configs[id(cfg)] = cfg
        return list(configs.values())

    def _set_implementation(self, name_for: Callable[[str], str]) -> None:
        """Switch every config that owns a patched module; other sub-models (e.g. a vision tower) stay as they are."""
        model_cfg = self.model.config
        if any(cfg is model_cfg for cfg in self.configs) or not getattr(model_cfg, "sub_configs", None):
            self.model.set_attn_implementation(name_for(model_cfg._attn_implementation))
            return
        wanted = {}
        for key in model_cfg.sub_configs:
            sub = getattr(model_cfg, key, None)
            if any(sub is cfg for cfg in self.configs):
                wanted[key] = name_for(sub._attn_implementation)
        self.model.set_attn_implementation(wanted)

    def _register(self) -> None:
        """Register the dispatch function and the base's mask function under our name for each base (idempotent)."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        for base in set(self.base_by_config.values()):
            AttentionInterface.register(NAME_PREFIX + base, _make_dispatch(base))
            AttentionMaskInterface.register(NAME_PREFIX + base, ALL_MASK_ATTENTION_FUNCTIONS[base])

    def attach(self, patch: PatchView) -> None:
        self._patch = patch
        self._register()
        for layer, module in self.modules:
            cfg = getattr(module, "config", None) or self.model.config
            base_fn = _base_function(module, self.base_by_config[id(cfg)])
            module.__dict__[_BINDING] = Binding(patch=patch, layer=layer, base_fn=base_fn, integration=self)
        # hooks are bound methods (and partials of them): a deep copy or a pickle of the model carries its own
        backbone = getattr(self.model, "base_model", self.model)
        if backbone is not self.model:
            self._handles.append(self.model.register_forward_pre_hook(self._note_logits_to_keep, with_kwargs=True))
        self._handles.append(backbone.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(backbone.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True))
        if patch.method.reads_layer_inputs:
            for layer, module in enumerate(decoder_layers(self.root)):
                if layer in patch.selected_layers:
                    hook = functools.partial(self._observe_layer_input, layer)
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        self._set_implementation(lambda base: NAME_PREFIX + base)

    @_outside_graphs
    def _note_logits_to_keep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """generate() asks for the logits of the last row only; assisted decoding asks for one per candidate it
        verifies (logits_to_keep = candidates + 1): the backbone's forward reads this."""
        keep = kwargs.get("logits_to_keep")
        self._local.logits_to_keep = keep if isinstance(keep, int) else None

    @_outside_graphs
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward of the backbone begins: find its sequence's state (with the KV cache it continues, or new) and
        make its context this thread's current one."""
        patch = self._patch
        bound = _forward_arguments(type(module), args, kwargs)
        cache = bound.get("cache", bound.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = bound.get("attention_mask")
        ids = bound.get("input_ids")
        embeds = bound.get("inputs_embeds")
        new = next((t.shape[1] for t in (ids, embeds) if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
        images = None
        if self.image_token_id is not None and isinstance(ids, torch.Tensor):
            images = image_positions(ids, self.image_token_id)
        keep = self._local.__dict__.pop("logits_to_keep", None)
        verified = keep if keep is not None and keep > 1 and past == 0 and _in_assisted_decoding() else None
        context = ForwardContext(
            past_length=past,
            attention_mask=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            cache_kind=_cache_kind(cache),
            image_mask=images,
            new_tokens=new,
            verified_rows=verified,
            cache=cache,
            state=self._sequence_state(cache, past),
        )
        patch.method.start_forward(context)
        patch.method.note_state(context.state)
        if cache is not None and context.state is not None:
            keep_sequence_state(cache, patch.key, context.state)
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(context)

    def _sequence_state(self, cache: Any, past: int) -> Any:
        """The method's state of the sequence this forward belongs to: new for a forward that starts one, else the
        one its KV cache carries."""
        method = self._patch.method
        if past == 0:
            return method.new_state()
        state = sequence_state(cache, self._patch.key)
        if state is None and method.new_state() is not None:
            raise RuntimeError(
                f"attnpatch {method.name}: this KV cache holds {past} tokens that this patch did not see (it was "
                "filled before the patch was applied, by another model or patch, or rebuilt without attnpatch's "
                "state); run the whole sequence through the patched model, starting without a cache"
            )
        return state

    @_outside_graphs
    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The forward ended (also when it raised): its context is no longer current; a KV cache the model made
        during the forward gets the sequence's state."""
        stack = getattr(self._local, "stack", None)
        context = stack.pop() if stack else None
        if context is None or context.state is None or context.cache is not None:
            return
        cache = output_cache(output)
        if cache is not None and hasattr(cache, "get_seq_length"):
            keep_sequence_state(cache, self._patch.key, context.state)

    @_outside_graphs
    def _observe_layer_input(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Hand the residual stream entering decoder layer `layer` to the method."""
        context = self.current()
        if context is not None:
            self._patch.method.observe_layer_input(layer, layer_input(args, kwargs), context)

    def detach(self) -> None:
        self._set_implementation(lambda name: name.removeprefix(NAME_PREFIX))
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, module in self.modules:
            module.__dict__.pop(_BINDING, None)
        self._patch = None


def _in_assisted_decoding(depth: int = 40) -> bool:
    """True inside transformers' assisted (speculative) decoding loop: its verification forwards ask for one logit row
    per candidate (logits_to_keep > 1), which scoring code does too, so the caller checks the generation loop."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "_assisted_decoding" and "transformers" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _forward_arguments(cls: type, args: tuple, kwargs: dict) -> dict:
    """The backbone forward's arguments by name."""
    try:
        return _forward_signature(cls).bind_partial(None, *args, **kwargs).arguments
    except TypeError:
        return kwargs


def sequence_state(cache: Any, key: str) -> Any:
    """The state a patch (by its key) keeps with a KV cache, or None."""
    return getattr(cache, "__dict__", {}).get(STATES, {}).get(key)


def keep_sequence_state(cache: Any, key: str, state: Any) -> None:
    """Keep `state` with the KV cache (an attribute of the cache object: a deep copy of the cache copies it)."""
    cache.__dict__.setdefault(STATES, {})[key] = state
