"""Intention conditioning (after AAD-LLM, Jiang et al., ACL 2025): a learned "intention token" tells a causal LM which
of several sources (speakers, documents, ...) the answer must be about.

The README's "Training adapters" section has the results. The paper's conditioning is an input token, not an
attention change: K learned embeddings, one per intention; the index comes from any decoder (in AAD-LLM, a
classifier of the listener's brain signals) and its embedding is inserted into the input sequence; the model (LoRA)
and the embeddings train with the ordinary LM loss on answers about the attended source.

`bias_layers` adds an experimental, non-paper variant: in those layers every head h gets a learned logit bias
`w[h] * segments[b, j]` toward the keys j of the selected source (`AdapterAttention.set_key_bias`); w starts at 0,
so at initialisation the bias changes nothing.

    cond = IntentionConditioner(model, num_intentions=2, bias_layers=[4, 8])
    out = cond(model, input_ids, attention_mask, intention, segments=segments, labels=labels)  # out.loss
    new_tokens = cond.generate(model, input_ids, attention_mask, intention, segments=segments, max_new_tokens=8)
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..integrations.structure import attention_modules
from ..methods.validators import check_layer
from .base import AttentionAdapterBase, transformers_model

IGNORE_INDEX = -100


@dataclass(frozen=True)
class IntentionConfig:
    """num_intentions: K, the number of learned intention embeddings; bias_layers: layers whose heads learn a logit
    bias toward the selected source's tokens (None: no bias, the paper's form); insert_after: real tokens kept before
    the intention token (0: it comes first; 1: after a BOS token)."""

    num_intentions: int = 2
    bias_layers: Sequence[int] | None = None
    insert_after: int = 0

    def __post_init__(self) -> None:
        k = self.num_intentions
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"num_intentions must be an integer >= 1, got {k!r}")
        n = self.insert_after
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"insert_after must be an integer >= 0, got {n!r}")
        layers = self.bias_layers
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
                raise ValueError(f"bias_layers must be a list of layer indices or None, got {layers!r}")
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                    raise ValueError(f"bias_layers must hold layer indices >= 0, got {layer!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"bias_layers has repeated layers: {list(layers)}")
            layers = tuple(sorted(int(x) for x in layers)) or None
        object.__setattr__(self, "num_intentions", int(k))
        object.__setattr__(self, "insert_after", int(n))
        object.__setattr__(self, "bias_layers", layers)


def input_embeddings(model: nn.Module) -> nn.Module:
    """`model.get_input_embeddings()`, checked to be a token-embedding module; TypeError otherwise."""
    try:
        embed = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embed = None
    weight = getattr(embed, "weight", None)
    if embed is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"{type(model).__name__} has no input token embeddings (get_input_embeddings()); the intention token is "
            "inserted as an input embedding, so the model must accept inputs_embeds"
        )
    return embed


@torch.no_grad()
def embedded_vocabulary_stats(embed: nn.Module, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-dimension std [hidden] of `embed(id)` over the vocabulary, in the scale `inputs_embeds` uses
    (e.g. with Gemma's sqrt(hidden) factor), computed in chunks."""
    weight = embed.weight
    vocab = weight.shape[0]
    total = sq = None
    for start in range(0, vocab, chunk):
        rows = embed(torch.arange(start, min(vocab, start + chunk), device=weight.device)).double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        sq = rows.pow(2).sum(0) if sq is None else sq + rows.pow(2).sum(0)
    mean = total / vocab
    std = (sq / vocab - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float()


def _as_index_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        tensor = torch.as_tensor(value)
    else:
        raise TypeError(f"{name} must be a LongTensor, got {type(value).__name__}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must hold integers (a LongTensor), got dtype {tensor.dtype}")
    return tensor.long()


class IntentionConditioner(AttentionAdapterBase):
    """Learned intention tokens (and optional per-head key biases) for a causal LM, PEFT-wrapped or not.

    Parameters: `embeddings` [K, hidden], initialised at the mean embedded token plus 0.1 std of noise (global torch
    RNG); `head_bias[str(layer)]` [query heads] per bias layer, initialised at 0. The model itself is not a
    submodule: optimise `conditioner.parameters()` next to the model's (LoRA) parameters.
    """

    kind = "intention"
    config_class = IntentionConfig

    def __init__(self, model: nn.Module, config: IntentionConfig | None = None, **options: Any):
        if config is None:
            config = IntentionConfig(**options)
        elif options:
            raise TypeError("pass either config= or keyword options, not both")
        elif not isinstance(config, IntentionConfig):
            raise TypeError(f"config must be an IntentionConfig, got {type(config).__name__}")
        target = transformers_model(model)
        embed = input_embeddings(target)
        num_layers = len(attention_modules(target))
        for layer in config.bias_layers or ():
            check_layer("bias_layers", layer, num_layers)
        mean, std = embedded_vocabulary_stats(embed)  # before patching: a failure leaves the model untouched
        # with no bias layers nothing is routed: the patched model runs its own attention on every layer
        super().__init__(model, config, layers=list(config.bias_layers or ()))
        noise = torch.randn(config.num_intentions, mean.shape[0]) * std.cpu()
        self.embeddings = nn.Parameter(mean[None, :] + 0.1 * noise.to(mean.device))
        heads = self.method.num_heads
        self.head_bias = nn.ParameterDict(
            {
                str(layer): nn.Parameter(torch.zeros(heads[layer], device=mean.device))
                for layer in config.bias_layers or ()
            }
        )

    # ---- inputs -----------------------------------------------------------------------------------------------------

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        intention: torch.Tensor,
        segments: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Insert each row's intention embedding before its first real token (after `insert_after` of them).

        input_ids, attention_mask, segments, labels: [B, L], left or right padded (the real tokens contiguous);
        intention: [B] indices in [0, K); segments: the selected source's tokens (weights, usually 0/1), used by the
        bias layers. Returns inputs_embeds [B, L+1, hidden], attention_mask, position_ids (as generate computes them)
        and, when given, labels (-100 at the intention token) [B, L+1]. With bias layers, also sets the key bias on
        the patched attention (segments moved to the new positions; none when segments is None) until `clear()`.
        """
        ids = _as_index_tensor(input_ids, "input_ids")
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
        batch, length = ids.shape
        device = self.embeddings.device
        ids = ids.to(device)
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = _as_index_tensor(attention_mask, "attention_mask").to(device)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}")
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) only")
        intent = _as_index_tensor(intention, "intention").to(device)
        if intent.shape != (batch,):
            raise ValueError(
                f"intention must be a [batch] = [{batch}] tensor of indices, got shape {tuple(intent.shape)}"
            )
        k = self.config.num_intentions
        if ((intent < 0) | (intent >= k)).any():
            raise ValueError(f"intention indices must lie in [0, {k}), got {intent.tolist()}")
        if segments is not None:
            if not isinstance(segments, torch.Tensor):
                raise TypeError(f"segments must be a tensor [batch, length], got {type(segments).__name__}")
            if segments.shape != ids.shape:
                raise ValueError(
                    f"segments has shape {tuple(segments.shape)} but input_ids {tuple(ids.shape)}; mark each token "
                    "of the selected source with 1"
                )
        if labels is not None:
            labels = _as_index_tensor(labels, "labels").to(device)
            if labels.shape != ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}")

        counts = mask.sum(1)
        first = mask.argmax(1)  # first real token (0 for an all-padding row, refused below)
        after = self.config.insert_after
        positions = torch.arange(length, device=device)
        real = (positions[None, :] >= first[:, None]) & (positions[None, :] < (first + counts)[:, None])
        if not torch.equal(real, mask.bool()):
            raise ValueError("attention_mask rows must be one run of real tokens (left or right padding)")
        short = (counts < max(after, 1)).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"rows {short} of attention_mask have fewer than {max(after, 1)} real token(s); the intention token "
                f"goes after the first {after} real token(s) of a row"
            )

        at = (first + after)[:, None]  # the intention token's position in the output
        new_pos = torch.arange(length + 1, device=device)[None, :]
        inserted = new_pos == at  # [B, L+1]
        source = (new_pos - (new_pos > at).long()).clamp_max(length - 1)  # output position -> input position

        def moved(x: torch.Tensor, fill: float | int) -> torch.Tensor:
            return x.gather(1, source).masked_fill(inserted, fill)

        embed = input_embeddings(self.target)
        tokens = embed(ids)
        hidden = tokens.shape[-1]
        if hidden != self.embeddings.shape[1]:
            raise ValueError(
                f"the model's embeddings have size {hidden}, the intention embeddings {self.embeddings.shape[1]}"
            )
        gathered = tokens.gather(1, source[:, :, None].expand(-1, -1, hidden))
        chosen = self.embeddings[intent].to(tokens.dtype)[:, None, :]
        out: dict[str, torch.Tensor] = {
            "inputs_embeds": torch.where(inserted[:, :, None], chosen, gathered),
            "attention_mask": moved(mask, 1),
        }
        position_ids = out["attention_mask"].cumsum(-1) - 1
        out["position_ids"] = position_ids.masked_fill(out["attention_mask"] == 0, 0)
        if labels is not None:
            out["labels"] = moved(labels, IGNORE_INDEX)
        if self.head_bias:
            if segments is None:
                self.method.set_key_bias(None)
            else:
                moved_segments = moved(segments.to(device, torch.float32), 0.0)
                weights = {int(layer): w for layer, w in self.head_bias.items()}
                self.method.set_key_bias(weights, moved_segments)
        return out

    def clear(self) -> None:
        """Remove the key bias `prepare` set (no-op without bias layers)."""
        if self.patch.active:
            self.method.set_key_bias(None)

    @contextlib.contextmanager
    def _biased(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.clear()

    def _check_model(self, model: nn.Module) -> None:
        if transformers_model(model) is not self.target:
            raise ValueError("model is not the model this IntentionConditioner was applied to")

    # ---- running the model ------------------------------------------------------------------------------------------

    def forward(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        intention: torch.Tensor,
        segments: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """`model(**prepare(...), **model_kwargs)`: the model's output (with `.loss` when labels are given), whose
        positions are those of the sequence with the intention token inserted."""
        self._check_model(model)
        inputs = self.prepare(input_ids, attention_mask, intention, segments, labels)
        with self._biased():
            return model(**inputs, **model_kwargs)

    def loss(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        intention: torch.Tensor,
        labels: torch.Tensor,
        segments: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """The LM loss of `model` on `labels` (-100: ignored), conditioned on `intention`."""
        if labels is None:
            raise ValueError("loss() needs labels ([batch, length], -100 where no loss is taken)")
        return self.forward(model, input_ids, attention_mask, intention, segments, labels, **model_kwargs).loss

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        intention: torch.Tensor,
        segments: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """`model.generate(inputs_embeds=..., attention_mask=...)` on the conditioned inputs; returns only the new
        tokens [B, new]. Left padding for batched prompts, as usual for generation. The key bias follows the prompt's
        keys through the KV cache (generated tokens get none)."""
        self._check_model(model)
        for name in ("inputs_embeds", "input_ids", "attention_mask", "position_ids"):
            if name in generate_kwargs:
                raise TypeError(f"generate() sets {name} itself; do not pass it in generate_kwargs")
        inputs = self.prepare(input_ids, attention_mask, intention, segments)
        with self._biased():
            out = model.generate(
                inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], **generate_kwargs
            )
        return out if isinstance(out, torch.Tensor) else out.sequences
