"""ACT: attention-sink calibration (Yu et al., "Unveiling and Harnessing Hidden Attention Sinks", ICML 2024).

Per selected (layer, head): keys whose mean attention over the query rows that see them exceeds `threshold` are
sinks; the first sink of each sequence (normally its first real token) is kept; every other sink's probability is
scaled by `beta` and the freed mass goes back to the remaining keys in proportion. The README's section "What ACT
does here, exactly" gives the choices made where the authors' code is silent or broken (batches, padding, KV-cache
decoding, GQA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels import reference
from ..kernels.act import ActOutput, ColumnStats, act_attention
from .base import TEXT_FAMILIES, AttentionCall, ForwardContext, Method, register_method
from .validators import HeadSpec, check_bool, check_number, resolve_heads

logger = logging.getLogger("attnpatch")


@dataclass(frozen=True)
class ACTConfig:
    """Options of `attnpatch.apply(model, "act", ...)`.

    beta: factor on sink probabilities, in [0, 1] (1 = no change). threshold: column-mean level above which a key
    is a sink, in [0, 1]. heads: None (every head of layers 2..L-2, the authors' layer range), "all", or
    {layer: [heads] | "all"}. keep_first_sink: leave the first detected sink alone (the authors' rule).
    min_visible_rows: a key is judged only once at least this many query rows have seen it (1 = the authors'
    statistic; larger values stop the last few tokens of a prompt passing the threshold on one or two rows).
    """

    beta: float = 0.4
    threshold: float = 0.1
    heads: Any = None
    keep_first_sink: bool = True
    min_visible_rows: int = 1

    def __post_init__(self) -> None:
        check_number("beta", self.beta, 0.0, 1.0)
        check_number("threshold", self.threshold, 0.0, 1.0)
        check_bool("keep_first_sink", self.keep_first_sink)
        check_number("min_visible_rows", self.min_visible_rows, 1, 2**31 - 1, integer=True)
        if not (self.heads is None or self.heads == "all" or isinstance(self.heads, dict)):
            raise ValueError(f"heads must be None, 'all' or a dict {{layer: [heads] | 'all'}}, got {self.heads!r}")


@register_method
class ACT(Method):
    name = "act"
    config_class = ACTConfig
    families = TEXT_FAMILIES
    neutral_options = {"beta": 1.0, "heads": "all"}

    def __init__(self, config: ACTConfig, num_layers: int, num_heads: list[int]):
        super().__init__(config, num_layers, num_heads)
        default_layers = range(2, max(2, num_layers - 1))
        self.heads: HeadSpec = resolve_heads(config.heads, num_layers, num_heads, default_layers)
        if config.heads is None and not self.heads:
            logger.warning(
                "attnpatch act: a %d-layer model has no layer in the default range 2..L-2, so nothing is calibrated; "
                "pass heads='all' or {layer: [heads]}.",
                num_layers,
            )
        elif config.heads is None:
            logger.warning(
                "attnpatch act: calibrating every head of layers 2..%d (%d heads); a calibration profile that "
                "selects heads is recommended.",
                num_layers - 2,
                sum(len(h) for h in self.heads.values()),
            )
        self._head_index = {layer: torch.tensor(h) for layer, h in self.heads.items()}
        self._check_layer = min(self.heads, default=None)  # where a reordered KV cache is detected

    def layers(self) -> set[int]:
        return set(self.heads)

    def selected_heads(self) -> dict[int, list[int]]:
        return {layer: list(heads) for layer, heads in sorted(self.heads.items())}

    def new_state(self) -> ACTSequence:
        return ACTSequence()

    @property
    def last_sinks(self) -> dict[int, torch.Tensor]:
        """layer -> [B, H_selected, Lk] bool: the sinks of the latest forward in this thread."""
        return self.latest("sinks")

    def column_stats(self) -> dict[int, ColumnStats]:
        """layer -> running column statistic of its selected heads (the heads of `self.heads[layer]`, in order) after
        the latest forward in this thread."""
        return self.latest("history")

    def start_forward(self, context: ForwardContext) -> None:
        state: ACTSequence = context.state
        past = context.past_length
        if past == 0:
            if context.verified_rows is not None:
                raise RuntimeError(
                    "attnpatch act: assisted decoding (assistant_model=, prompt_lookup_num_tokens=) verified its first "
                    f"{context.verified_rows - 1} candidate tokens in the same forward as the prompt, so ACT's prompt "
                    "statistic would count the candidates' rows and the result would not be what greedy decoding "
                    "gives. Fill the cache with the prompt first and let assisted decoding continue it: "
                    "cache = DynamicCache(); model(input_ids[:, :-1], cache=cache); "
                    "model.generate(input_ids, cache=cache, ...) (before transformers 5.25: past_key_values=cache)."
                )
            return
        if context.cache_kind != "dynamic":
            raise NotImplementedError(
                "attnpatch act: decoding with this cache type is not supported (its key order is not the token "
                "order); use the default DynamicCache (generate(..., cache_implementation='dynamic'))."
            )
        if past < state.length:
            state.crop(past)
        elif past > state.length:
            raise RuntimeError(
                f"attnpatch act: the KV cache holds {past} tokens but ACT's statistic of this sequence covers "
                f"{state.length}: the cache was extended without the patch; run the sequence through the patched "
                "model from its start"
            )

    def _history_for(self, call: AttentionCall) -> ColumnStats | None:
        """The running statistic this call continues, checked against the cache it comes with."""
        if call.past_length == 0:
            return None
        state: ACTSequence = call.state
        history = state.history.get(call.layer)
        batch = call.query.shape[0]
        if history is None or history.colsum.shape[-1] != call.past_length or history.colsum.shape[0] != batch:
            seen = None if history is None else tuple(history.colsum.shape)
            raise RuntimeError(
                f"attnpatch act: the sink statistic of layer {call.layer} is out of step with the KV cache "
                f"(cache holds {call.past_length} tokens for batch {batch}, statistic shape {seen}); ACT follows a "
                "cache through greedy decoding, sampling, chunked prefill and assisted decoding, not a cache whose "
                "batch was changed; run the sequence again from its start."
            )
        # a reordered cache (beam search) reorders every layer: checking the first calibrated one is enough, and the
        # comparison reads back from the GPU, so once per step rather than once per layer
        if call.layer == self._check_layer and state.keys is not None:
            position = call.past_length - 1
            index = position - call.key_offset
            stored = position - state.keys_start
            if 0 <= index < call.key.shape[2] and 0 <= stored < state.keys.shape[2]:
                if not torch.equal(state.keys[:, :, stored], call.key[:, :, index]):
                    raise RuntimeError(
                        "attnpatch act: the KV cache rows were reordered (beam search, contrastive search): ACT's "
                        "per-sequence sink statistic cannot follow that; use greedy decoding or sampling "
                        "(num_beams=1)."
                    )
        return history

    def remember(self, call: AttentionCall, stats: ColumnStats, sinks: torch.Tensor) -> None:
        """Keep a call's running statistic with its sequence for the next step, and its sinks."""
        state: ACTSequence = call.state
        state.history[call.layer] = stats
        state.sinks[call.layer] = sinks
        state.length = call.past_length + call.query.shape[2]
        if call.layer == self._check_layer:  # the keys of this forward, and the one before it (reorder check)
            first = max(0, call.past_length - 1 - call.key_offset)
            state.keys, state.keys_start = call.key[:, :, first:].clone(), call.key_offset + first

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        heads = self._head_index.get(call.layer)
        if heads is None:
            return None
        if call.dropout > 0:
            raise RuntimeError("attnpatch act is an inference-time method: call model.eval() (dropout is active).")
        q, k = call.query, call.key
        hq = q.shape[1]
        every_head = len(heads) == hq
        q_selected = q if every_head else q[:, heads.to(q.device)]
        history = self._history_for(call)
        state: ACTSequence = call.state
        if call.past_length == 0:
            result = self._calibrate(call, q_selected, heads, history)
            state.checkpoints.pop(call.layer, None)
        else:  # a continuation of the sequence: its rows one by one, as token-by-token decoding computes them
            result, checkpoints = self._calibrate_rows(call, q_selected, heads, history)
            state.row_start = call.past_length
            state.checkpoints[call.layer] = checkpoints
        self.remember(call, result.stats, result.sinks)
        if every_head:
            out = result.out.transpose(1, 2).contiguous()
        else:
            out = call.base()[0].clone()
            out[:, :, heads.to(out.device)] = result.out.transpose(1, 2)
        weights = None
        if call.output_attentions:
            weights = reference.attention_probs(
                q,
                k,
                scale=call.scale,
                mask=call.mask,
                causal=call.causal,
                sliding_window=call.sliding_window,
                softcap=call.softcap,
            ).float()
            weights[:, heads.to(q.device)] = result.probs
            weights = weights.to(q.dtype)
        return out, weights

    def _calibrate(
        self, call: AttentionCall, q: torch.Tensor, heads: torch.Tensor, history: ColumnStats | None, **geometry
    ) -> ActOutput:
        """ACT on every row of `q` at once, against `call`'s keys (or those `geometry` overrides)."""
        cfg = self.config
        hq, hkv = call.query.shape[1], call.key.shape[1]
        options = dict(
            mask=call.mask, causal=call.causal, sliding_window=call.sliding_window, query_valid=call.query_valid
        )
        options.update(geometry)
        k = options.pop("key", call.key)
        v = options.pop("value", call.value)
        return act_attention(
            q,
            k,
            v,
            scale=call.scale,
            beta=cfg.beta,
            threshold=cfg.threshold,
            keep_first_sink=cfg.keep_first_sink,
            min_visible_rows=cfg.min_visible_rows,
            softcap=call.softcap,
            kv_head_index=heads // (hq // hkv),
            history=history,
            key_offset=call.key_offset,
            return_probs=call.output_attentions,
            mask_memo=call.mask_memo if "mask" not in geometry else None,
            **options,
        )

    def _calibrate_rows(
        self, call: AttentionCall, q: torch.Tensor, heads: torch.Tensor, history: ColumnStats | None
    ) -> tuple[ActOutput, list[ColumnStats]]:
        """ACT on a forward that continues a cached sequence, one row at a time: row i's sinks come from the statistic
        up to and including row i, as when the tokens are decoded one by one, so a chunk, a verification forward of
        assisted decoding and token-by-token decoding give the same result. Returns the result (the last row's sinks
        and statistic) and the statistic before each row and after the last (what `cache.crop` cuts back to)."""
        lq = q.shape[2]
        if lq == 1:
            result = self._calibrate(call, q, heads, history)
            return result, [history, result.stats]
        checkpoints = [history]
        outs, probs = [], []
        lk = call.key.shape[2]
        for i in range(lq):
            end = call.past_length + i + 1 - call.key_offset  # this row's own key, as an index into call.key
            mask = call.mask[:, :, i : i + 1, :end] if isinstance(call.mask, torch.Tensor) else None
            if mask is None:
                mask = _window_visibility(end, call.past_length + i - call.key_offset, call.sliding_window, q.device)
            valid = call.query_valid[:, i : i + 1] if call.query_valid is not None else None
            result = self._calibrate(
                call, q[:, :, i : i + 1], heads, checkpoints[-1], key=call.key[:, :, :end],
                value=call.value[:, :, :end], mask=mask, causal=False, sliding_window=None, query_valid=valid,
            )  # fmt: skip
            checkpoints.append(result.stats)
            outs.append(result.out)
            if result.probs is not None:
                probs.append(torch.nn.functional.pad(result.probs, (0, lk - end)))
        sinks = torch.nn.functional.pad(result.sinks, (0, lk - result.sinks.shape[-1]))
        merged = ActOutput(
            out=torch.cat(outs, dim=2),
            stats=result.stats,
            sinks=sinks,
            probs=torch.cat(probs, dim=2) if probs else None,
        )
        return merged, checkpoints


def _window_visibility(length: int, row: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[1, 1, 1, length] bool: the keys a row at index `row` sees among `length` (its window, when it has one)."""
    cols = torch.arange(length, device=device)
    visible = cols <= row
    if window is not None:
        visible &= cols > row - window
    return visible[None, None, None]


@dataclass
class ACTSequence:
    """ACT's state of one sequence (one batch of rows sharing a KV cache), kept with that cache.

    `history`: each calibrated layer's running column statistic by absolute key position; `length`: the tokens it
    covers; `sinks`: the latest forward's sinks per layer; `keys`/`keys_start`: the first calibrated layer's keys of
    the latest forward (and the one before it), to notice a reordered cache; `checkpoints`/`row_start`: the statistic
    before each row of the latest forward that continued the sequence and after its last, so that `cache.crop` (which
    assisted decoding calls after verifying its candidates) cuts the statistic back exactly."""

    length: int = 0
    history: dict[int, ColumnStats] = field(default_factory=dict)
    sinks: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: torch.Tensor | None = None
    keys_start: int = 0
    checkpoints: dict[int, list[ColumnStats | None]] = field(default_factory=dict)
    row_start: int = 0

    def crop(self, length: int) -> None:
        """Cut the sequence back to its first `length` tokens (the KV cache was cropped to that length)."""
        kept = length - self.row_start
        if not self.checkpoints or kept < 0 or any(kept >= len(c) for c in self.checkpoints.values()):
            raise RuntimeError(
                f"attnpatch act: the KV cache was cut back to {length} tokens, before the latest forward of the "
                f"sequence (it started at {self.row_start}); ACT can cut its statistic back only within that forward "
                "(as assisted decoding does after verifying candidates). Run the sequence again from its start."
            )
        self.history = {
            layer: _cut(checkpoints[kept], length)
            for layer, checkpoints in self.checkpoints.items()
            if checkpoints[kept] is not None
        }
        self.checkpoints = {layer: checkpoints[: kept + 1] for layer, checkpoints in self.checkpoints.items()}
        if self.keys is not None:
            self.keys = self.keys[:, :, : max(0, length - self.keys_start)]
        self.length = length


def _cut(stats: ColumnStats, length: int) -> ColumnStats:
    return ColumnStats(colsum=stats.colsum[..., :length], count=stats.count[..., :length])
