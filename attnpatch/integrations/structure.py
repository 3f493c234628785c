"""Where a model keeps its attention: attention modules, decoder layers, the language model, image tokens.

Read-only helpers on the module tree, shared by the integrations, calibration, analysis and the adapters. An attention
module is one whose class calls transformers' AttentionInterface. LLaVA-style models (LLaVA, LLaVA-NeXT, ...) splice
image features into the text sequence at positions holding the config's image token id; `get_decoder()` returns the
language model's backbone. Text-only models have no image token id, and their decoder is the backbone itself.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from ..methods.base import UnsupportedModelError

IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")


@functools.cache
def unwrap(model: nn.Module) -> nn.Module:
    """The model a patch reaches inside a wrapper: a PEFT PeftModel's base model (its LoRA layers stay in it and keep
    working). A torch.compile'd module is refused: its graphs were traced from the unpatched model."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        inner = type(model._orig_mod).__name__
        raise UnsupportedModelError(
            f"attnpatch cannot patch a torch.compile'd {inner}: its compiled graphs were traced from the unpatched "
            "model. Apply first, then compile: patch = attnpatch.apply(model, ...); compiled = torch.compile(model)"
        )
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__module__.startswith("peft."):
        inner = get_base_model()
        if isinstance(inner, nn.Module) and inner is not model:
            return unwrap(inner)
    return model


@functools.cache
def dispatches_through_registry(cls: type) -> bool:
    """True when the class's forward calls the AttentionInterface (the module transformers passes to the function)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source


def attention_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, module) of every attention module that calls the registry, in layer order."""
    found = [m for m in model.modules() if dispatches_through_registry(type(m))]
    indexed = []
    for position, module in enumerate(found):
        layer = getattr(module, "layer_idx", None)
        indexed.append((layer if isinstance(layer, int) else position, module))
    if len({layer for layer, _ in indexed}) != len(indexed):  # several stacks (e.g. encoder-decoder): number them
        indexed = list(enumerate(found))
    return sorted(indexed, key=lambda item: item[0])


def num_query_heads(module: nn.Module) -> int:
    """The number of query heads of an attention module."""
    config = getattr(module, "config", None)
    for value in (
        getattr(config, "num_attention_heads", None),
        getattr(module, "num_attention_heads", None),
        getattr(module, "num_heads", None),
    ):
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"cannot read the number of heads of {type(module).__name__}")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers in order: the entries of the ModuleList that holds the attention modules."""
    attention = [module for _, module in attention_modules(model)]
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(attention):
            owners = [next((a for a in attention if any(a is m for m in layer.modules())), None) for layer in module]
            if all(o is not None for o in owners) and len({id(o) for o in owners}) == len(attention):
                return list(module)
    raise TypeError(f"cannot find one ModuleList of decoder layers in {type(model).__name__}")


def language_model(model: nn.Module) -> nn.Module:
    """The text backbone (decoder stack) of `model`: `get_decoder()` where the class has it, else the model."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
        if isinstance(decoder, nn.Module):
            return decoder
    return model


def text_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of the language model, in order."""
    return decoder_layers(language_model(model))


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer's forward pre-hook receives (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def image_token_id(model: nn.Module) -> int | None:
    """The token id that marks image positions in `input_ids`, or None for a model without one (text-only)."""
    config = getattr(model, "config", None)
    for key in IMAGE_TOKEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def image_positions(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """[B, L] bool: the positions of image tokens (after the processor's expansion, one per image feature)."""
    return input_ids == token_id
