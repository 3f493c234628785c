"""What a vision-language model exposes to attnpatch: its language model, its decoder layers, its image tokens.

LLaVA-style models (LLaVA, LLaVA-NeXT, ...) in transformers splice image features into the text sequence at
positions holding the config's image token id; `get_decoder()` returns the language model's backbone. Text-only
models have no image token id, and their decoder is the backbone itself.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")


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
    from ..calibrate.replay import decoder_layers

    return decoder_layers(language_model(model))


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
