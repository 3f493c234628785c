"""How attnpatch reaches the attention of a transformers model: the AttentionInterface registry.

apply: remember the model's attention implementation (the base), register one dispatch function per base under
`attnpatch_<base>` in AttentionInterface together with the base's own mask function in AttentionMaskInterface (without
it, transformers hands the function attention_mask=None and padded batches go silently wrong), bind each attention
module to its Patch, and switch the model to that name. Layers a method does not select go to the captured base
function untouched. A forward pre-hook on the backbone records what a call cannot see on its own: how many tokens
the KV cache held before this forward and the 2-D padding mask. remove: switch back, drop hooks and bindings.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels import reference
from ..methods.base import AttentionCall, ForwardContext, PatchView, UnsupportedModelError
from .structure import (
    attention_modules,
    decoder_layers,
    image_positions,
    image_token_id,
    language_model,
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


def _unpatched_maps(module: nn.Module, query, key, mask, kwargs) -> torch.Tensor:
    """The attention probabilities [B, Hq, Lq, Lk] eager attention would return for this call, in the query's dtype.

    `output_attentions=True` gets one map per layer on every base: the `sdpa` base returns none, so the layers it runs
    (and methods that leave the probabilities as they are) get them computed here."""
    scale = kwargs.get("scaling")
    probs = reference.attention_probs(
        query,
        key,
        scale=float(scale) if scale is not None else query.shape[-1] ** -0.5,
        mask=mask,
        causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
    )
    return probs.to(query.dtype)


def _make_call(binding, module, query, key, value, mask, kwargs, base) -> AttentionCall:
    ctx: ForwardContext = binding.patch.context or ForwardContext()
    batch, _, lq, head_dim = query.shape
    lk = key.shape[2]
    past = ctx.past_length
    key_offset = past + lq - lk if lk <= past + lq else 0
    query_valid = None
    pad = ctx.attention_mask
    if pad is not None and pad.dim() == 2 and pad.shape == (batch, past + lq):
        query_valid = pad[:, past:].to(device=query.device, dtype=torch.bool)
    scale = kwargs.get("scaling")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attnpatch: learned attention-sink logits (s_aux, gpt-oss) are not supported yet")
    return AttentionCall(
        layer=binding.layer,
        query=query,
        key=key,
        value=value,
        mask=mask,
        scale=float(scale) if scale is not None else head_dim**-0.5,
        causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
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

    def attach(self, patch: PatchView) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        for base in set(self.base_by_config.values()):
            AttentionInterface.register(NAME_PREFIX + base, _make_dispatch(base))
            AttentionMaskInterface.register(NAME_PREFIX + base, ALL_MASK_ATTENTION_FUNCTIONS[base])
        for layer, module in self.modules:
            cfg = getattr(module, "config", None) or self.model.config
            base_fn = _base_function(module, self.base_by_config[id(cfg)])
            module.__dict__[_BINDING] = Binding(patch=patch, layer=layer, base_fn=base_fn)
        backbone = getattr(self.model, "base_model", self.model)
        signature = inspect.signature(backbone.forward)

        @_outside_graphs
        def record_context(_module, args, kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = kwargs
            cache = bound.get("cache", bound.get("past_key_values"))
            past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
            mask = bound.get("attention_mask")
            ids = bound.get("input_ids")
            images = None
            if self.image_token_id is not None and isinstance(ids, torch.Tensor):
                images = image_positions(ids, self.image_token_id)
            patch.context = ForwardContext(
                past_length=past,
                attention_mask=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
                cache_kind=_cache_kind(cache),
                image_mask=images,
            )
            patch.method.start_forward(patch.context)

        @_outside_graphs
        def clear_context(_module, _args, _output):
            patch.context = None

        self._handles.append(backbone.register_forward_pre_hook(record_context, with_kwargs=True))
        self._handles.append(backbone.register_forward_hook(clear_context))
        if patch.method.reads_layer_inputs:
            self._hook_layer_inputs(patch)
        self._set_implementation(lambda base: NAME_PREFIX + base)

    def _hook_layer_inputs(self, patch: PatchView) -> None:
        """Hand the residual stream entering each selected decoder layer to the method."""
        for layer, module in enumerate(decoder_layers(self.root)):
            if layer not in patch.selected_layers:
                continue

            @_outside_graphs
            def observe(_module, args, kwargs, layer=layer):
                hidden = args[0] if args else kwargs["hidden_states"]
                patch.method.observe_layer_input(layer, hidden, patch.context or ForwardContext())

            self._handles.append(module.register_forward_pre_hook(observe, with_kwargs=True))

    def detach(self) -> None:
        self._set_implementation(lambda name: name.removeprefix(NAME_PREFIX))
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, module in self.modules:
            module.__dict__.pop(_BINDING, None)
