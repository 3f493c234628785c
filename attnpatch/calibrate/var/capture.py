"""Capture for VAR calibration: the prompts (tokenised, with "token@position" labels) and forward pre-hooks that record
the residual stream entering each decoder layer, reduced to VAR's massive-activation ratio |x[d]| / RMS(x)
(`attnpatch.methods.var.massive_ratios`, the statistic the method thresholds)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...integrations.structure import layer_input, text_decoder_layers
from ...methods.var import massive_ratios
from ..replay import StopForward

DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It was a sunny afternoon.\nThen the rain started.",
    "In 1905, Albert Einstein published four papers that changed physics. One of them explained the photoelectric "
    "effect, and another introduced special relativity.",
    "To make a cup of tea, boil some water and pour it over the leaves.\nWait three minutes. Add milk if you like.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "The committee met on Tuesday to discuss the budget. After a long debate, the members agreed to postpone the "
    "vote until next month, when more data would be available.",
    "Dear Anna,\nThank you for your letter. We are all well here, and the garden is full of flowers.\nBest wishes, Tom",
    "Photosynthesis converts light energy into chemical energy. Plants use carbon dioxide and water to produce "
    "glucose and oxygen.",
    "Shopping list: apples, bread, cheese, and coffee.\nDon't forget to pay the electricity bill before Friday.",
)


@dataclass
class _Prompt:
    ids: torch.Tensor  # [T]
    labels: list[str]  # "token@position"


def _label(tokenizer: Any, token_id: int, position: int) -> str:
    if tokenizer is None:
        return f"#{token_id}@{position}"
    text = tokenizer.decode([token_id])
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return f"{text}@{position}"


def _prompts(tokenizer: Any, texts: Sequence[Any] | None) -> list[_Prompt]:
    """Token ids of each prompt (strings tokenised with the tokenizer's default special tokens)."""
    texts = list(DEFAULT_TEXTS if texts is None else texts)
    if not texts:
        raise ValueError("VAR calibration needs at least one prompt")
    prompts = []
    for text in texts:
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token-id lists to calibrate without one")
            ids = torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        else:
            ids = torch.as_tensor(text, dtype=torch.long)
        ids = ids.reshape(-1)
        prompts.append(_Prompt(ids, [_label(tokenizer, int(t), p) for p, t in enumerate(ids.tolist())]))
    return prompts


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return embeddings.weight.device
    return next(model.parameters()).device


def _as_batch(input_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def capture_layer_inputs(
    model: nn.Module,
    input_ids: Any,
    attention_mask: torch.Tensor | None,
    reduce: Callable[[int, torch.Tensor], Any],
    min_layer: int = 2,
) -> dict[int, Any]:
    """{layer: reduce(layer, x)} for each decoder layer >= min_layer, x = its input residual stream [N, D] over the
    N real (unpadded) tokens in (batch, position) order. The forward stops at the last layer's input."""
    layers = text_decoder_layers(model)
    ids = _as_batch(input_ids).to(_input_device(model))
    mask = None if attention_mask is None else _as_batch(attention_mask).to(ids.device).bool()
    out: dict[int, Any] = {}

    def hook(index: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = layer_input(args, kwargs).detach()
            x = x[mask.to(x.device)] if mask is not None else x.reshape(-1, x.shape[-1])
            out[index] = reduce(index, x)
            if index == len(layers) - 1:
                raise StopForward

        return pre_hook

    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(min_layer, len(layers))]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=None if mask is None else mask.long(), use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out


def layer_input_ratios(
    model: nn.Module,
    input_ids: Any,
    attention_mask: torch.Tensor | None = None,
    *,
    min_layer: int = 2,
    dims: Sequence[int] | None = None,
) -> dict[int, torch.Tensor]:
    """{layer: |x| / RMS(x) [N, D] fp32 on CPU} of the residual stream entering each decoder layer >= min_layer, over
    the N real tokens (pads excluded); with `dims`, only those columns [N, len(dims)] are kept."""
    index = None if dims is None else torch.as_tensor(list(dims), dtype=torch.long)

    def reduce(layer: int, x: torch.Tensor) -> torch.Tensor:
        return massive_ratios(x, None if index is None else index.to(x.device)).cpu()

    return capture_layer_inputs(model, input_ids, attention_mask, reduce, min_layer)


@dataclass
class _LayerStats:
    """Pass-1 summary of one (prompt, layer): the massive entries and per-token maxima and norms."""

    token: torch.Tensor  # [M] token index of each massive entry
    dim: torch.Tensor  # [M]
    value: torch.Tensor  # [M]
    max_value: torch.Tensor  # [N] largest ratio of each token
    max_dim: torch.Tensor  # [N]
    norm: torch.Tensor  # [N] L2 norm of each token's residual stream
    hidden: int


def _massive_reducer(tau: float) -> Callable[[int, torch.Tensor], _LayerStats]:
    def reduce(layer: int, x: torch.Tensor) -> _LayerStats:
        r = massive_ratios(x)
        token, dim = (r > tau).nonzero(as_tuple=True)
        max_value, max_dim = r.max(-1)
        norm = x.float().norm(dim=-1)
        tensors = (t.cpu() for t in (token, dim, r[token, dim], max_value, max_dim, norm))
        return _LayerStats(*tensors, hidden=r.shape[-1])

    return reduce
