"""VAR: visual attention redistribution (Kang et al., "See What You Are Told", ICLR 2025).

For a vision-language model: at each selected decoder layer, tokens whose residual stream has a massive activation on
a sink dimension (max_d |x[d]| / RMS(x) > tau) are sinks. In every (head, text-query row) whose attention is
image-centric, each sink keeps `keep_fraction` of its probability and the rest goes to the non-sink image tokens in
proportion. Sinks come from the prompt (generated tokens never are); the selection is re-run at every step. Only the
language model is patched. Paper conventions by default; `match_released_code=True` reproduces the authors' code
(sink-portion test, last layer included). The README's section "VAR: visual attention redistribution" says where
this differs from the authors' code and what was checked against it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.var import var_attention
from .base import AttentionCall, ForwardContext, Method, register_method
from .validators import check_bool, check_layer, check_number

RMS_EPSILON = 1e-6


@dataclass(frozen=True)
class VARConfig:
    """Options of `attnpatch.apply(model, "var", ...)`.

    sink_dims: hidden dimensions whose massive activations mark sink tokens (from `attnpatch.calibrate(...,
    method="var")` or a profile). tau: sink threshold on |x[d]| / RMS(x). rho: image-centric threshold (paper: non-sink
    share of the row's image attention >= rho; released code: visual-sink share <= rho). summ: minimum image mass of
    a row. keep_fraction: share of its probability each sink keeps in a selected row (1 = no change). layers: None
    (2..L-2 as in the paper; 2..L-1 with match_released_code) or a list of layer indices.
    """

    sink_dims: Any = None
    tau: float = 20.0
    rho: float = 0.5
    summ: float = 0.2
    keep_fraction: float = 0.6
    layers: Any = None
    match_released_code: bool = False

    def __post_init__(self) -> None:
        if self.sink_dims is not None:
            dims = list(self.sink_dims) if isinstance(self.sink_dims, (list, tuple, set)) else None
            if not dims or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
                raise ValueError(f"sink_dims must be a non-empty list of hidden dimensions, got {self.sink_dims!r}")
            if min(dims) < 0:
                raise ValueError(f"sink_dims must be >= 0, got {sorted(dims)}")
            object.__setattr__(self, "sink_dims", tuple(sorted({int(d) for d in dims})))
        check_number("tau", self.tau, 0.0, float("inf"))
        check_number("rho", self.rho, 0.0, 1.0)
        check_number("summ", self.summ, 0.0, 1.0)
        check_number("keep_fraction", self.keep_fraction, 0.0, 1.0)
        check_bool("match_released_code", self.match_released_code)
        if self.layers is not None and not (
            isinstance(self.layers, (list, tuple, range))
            and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in self.layers)
        ):
            raise ValueError(f"layers must be None or a list of layer indices, got {self.layers!r}")

    @property
    def convention(self) -> str:
        return "code" if self.match_released_code else "paper"


def massive_ratios(hidden: torch.Tensor, dims: Any = None) -> torch.Tensor:
    """VAR's massive-activation ratio |x[d]| / RMS(x) over the last dimension, in float32, RMS without the norm
    weight (eps RMS_EPSILON): [..., D], or [..., len(dims)] for the given `dims`. What calibration measures and what
    `sink_scores` thresholds."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).add_(RMS_EPSILON).sqrt_()
    return (x if dims is None else x[..., dims]).abs() / rms


def sink_scores(hidden: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """[B, L] max over `dims` of |x[d]| / RMS(x) (`massive_ratios`): tokens above tau are sinks."""
    return massive_ratios(hidden, dims).amax(-1)


@register_method
class VAR(Method):
    name = "var"
    families = ("llava",)
    neutral_options = {"sink_dims": [3], "keep_fraction": 1.0}  # sinks keep all their attention
    config_class = VARConfig
    scope = "language"
    reads_layer_inputs = True

    def __init__(self, config: VARConfig, num_layers: int, num_heads: list[int]):
        super().__init__(config, num_layers, num_heads)
        if config.sink_dims is None:
            raise ValueError(
                "attnpatch var needs the sink dimensions of this model's language model: discover them with "
                "`profile = attnpatch.calibrate(model, tokenizer, method='var')` and pass `profile=profile` "
                "(or a saved profile directory), or give sink_dims=[...] explicitly."
            )
        last = num_layers if config.match_released_code else num_layers - 1
        layers = range(2, last) if config.layers is None else config.layers
        self._layers = {check_layer("layers", layer, num_layers) for layer in layers}
        if not self._layers:
            raise ValueError(f"no layer to patch: a {num_layers}-layer model has none in 2..L-2; pass layers=[...]")
        self._dims = torch.tensor(config.sink_dims)

    def check_model(self, model_info: Any) -> None:
        if model_info.image_token_id is None:
            raise TypeError(
                f"attnpatch var redistributes attention to image tokens, and {type(model_info.model).__name__} has "
                "no image token id (a text-only model); use a vision-language model such as "
                "LlavaForConditionalGeneration, or method 'act' for text models."
            )
        hidden = model_info.hidden_size
        if hidden is not None and max(self.config.sink_dims) >= hidden:
            raise ValueError(
                f"sink_dims {list(self.config.sink_dims)} do not fit the language model's hidden size {hidden}; "
                "were they calibrated on another model? Run attnpatch.calibrate(model, tokenizer, method='var')."
            )

    def layers(self) -> set[int]:
        return set(self._layers)

    def new_state(self) -> VARSequence:
        return VARSequence()

    @property
    def sinks(self) -> dict[int, torch.Tensor]:
        """layer -> [B, T] sink tokens of the sequence of the latest forward in this thread."""
        return self.latest("sinks")

    @property
    def last_selected(self) -> dict[int, torch.Tensor]:
        """layer -> [B, H, Lq] (head, row) pairs the latest forward in this thread redistributed."""
        return self.latest("selected")

    def start_forward(self, context: ForwardContext) -> None:
        state: VARSequence = context.state
        past = context.past_length
        images = context.image_mask
        if past == 0:
            if images is None:
                raise ValueError(
                    "attnpatch var finds the image tokens in input_ids: call the model (or generate) with input_ids "
                    "holding the image tokens, not inputs_embeds."
                )
            if not bool(images.any()):
                raise ValueError(
                    "attnpatch var: this batch has no image tokens, so there is nothing to redistribute to; pass the "
                    "images (pixel_values) with their image tokens, or remove the patch for text-only prompts."
                )
            state.image = images
        else:
            if state.image is None or state.image.shape[1] < past:
                raise RuntimeError(
                    f"attnpatch var: the KV cache holds {past} tokens but the patch saw "
                    f"{0 if state.image is None else state.image.shape[1]} of this sequence; run the prompt through "
                    "the patched model first, starting without a cache."
                )
            state.crop(past)  # cache.crop (assisted decoding) cut the sequence back; a no-op otherwise
            # image keys are the image tokens of the prompt: an image token id fed or generated later is text (the
            # model gives it its token embedding, not image features)
            new = context.new_tokens if context.new_tokens is not None else 0
            state.image = torch.cat([state.image, state.image.new_zeros(state.image.shape[0], new)], dim=1)
        # text rows after the first image of their sequence (the text that refers to the image), real tokens only
        length = state.image.shape[1]
        first_image = torch.where(state.image.any(1), state.image.to(torch.uint8).argmax(1), length)
        position = torch.arange(past, length, device=state.image.device)
        rows = (position[None] > first_image[:, None]) & ~state.image[:, past:]
        mask = context.attention_mask
        if mask is not None and mask.shape == state.image.shape:
            rows &= mask[:, past:].to(device=rows.device, dtype=torch.bool)
        state.rows = rows

    def observe_layer_input(self, layer: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        state: VARSequence = context.state
        batch, length = hidden.shape[:2]
        if context.past_length == 0:  # the prompt: sinks by massive activation, pad tokens never
            sinks = sink_scores(hidden, self._dims.to(hidden.device)) > self.config.tau
            mask = context.attention_mask
            if mask is not None and mask.shape == sinks.shape:
                sinks &= mask.to(device=sinks.device, dtype=torch.bool)
            state.sinks[layer] = sinks
            return
        previous = state.sinks.get(layer)
        if previous is None:
            raise RuntimeError(
                f"attnpatch var: layer {layer} has no sinks from this sequence's prompt; run the prompt through the "
                "patched model first, starting without a cache."
            )
        # generated (and later) tokens are never sinks
        state.sinks[layer] = torch.cat([previous[:, : context.past_length], previous.new_zeros(batch, length)], dim=1)

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        state: VARSequence = call.state
        sinks = state.sinks.get(call.layer)
        if sinks is None or state.image is None or state.rows is None:
            raise RuntimeError(
                f"attnpatch var: the attention of layer {call.layer} ran without the sink tokens of its input; VAR "
                "works on the language model inside the full vision-language model's forward."
            )
        if call.dropout > 0:
            raise RuntimeError("attnpatch var is an inference-time method: call model.eval() (dropout is active).")
        total = call.past_length + call.query.shape[2]
        if sinks.shape[1] != total or state.image.shape[1] != total:
            raise RuntimeError(
                f"attnpatch var: layer {call.layer} sees {total} tokens but the patch tracked {sinks.shape[1]}; "
                "run the sequence through the patched model from its start."
            )
        keys = slice(call.key_offset, call.key_offset + call.key.shape[2])
        rows = state.rows.to(call.query.device)
        if call.query_valid is not None:
            rows = rows & call.query_valid
        hq, hkv = call.query.shape[1], call.key.shape[1]
        cfg = self.config
        result = var_attention(
            call.query,
            call.key,
            call.value,
            scale=call.scale,
            sinks=sinks[:, keys].to(call.query.device),
            image=state.image[:, keys].to(call.query.device),
            rows=rows,
            keep_fraction=cfg.keep_fraction,
            rho=cfg.rho,
            summ=cfg.summ,
            convention=cfg.convention,
            mask=call.mask,
            causal=call.causal,
            sliding_window=call.sliding_window,
            softcap=call.softcap,
            kv_head_index=torch.arange(hq) // (hq // hkv),
            return_selected=True,
            return_probs=call.output_attentions,
            mask_memo=call.mask_memo,
        )
        state.selected[call.layer] = result.selected
        weights = result.probs.to(call.query.dtype) if result.probs is not None else None
        return result.out.transpose(1, 2), weights


@dataclass
class VARSequence:
    """VAR's state of one sequence (one batch of rows sharing a KV cache), kept with that cache: the image tokens
    [B, T] and each layer's sink tokens [B, T] by absolute position, the rows of the current forward VAR may change,
    and the latest forward's (head, row) selections."""

    image: torch.Tensor | None = None
    sinks: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: torch.Tensor | None = None
    selected: dict[int, torch.Tensor] = field(default_factory=dict)

    def crop(self, length: int) -> None:
        """Cut the sequence back to its first `length` tokens (positions are independent, so this is exact)."""
        if self.image is not None:
            self.image = self.image[:, :length]
        self.sinks = {layer: sinks[:, :length] for layer, sinks in self.sinks.items()}
