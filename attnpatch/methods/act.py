"""ACT: attention-sink calibration (Yu et al., "Unveiling and Harnessing Hidden Attention Sinks", ICML 2024).

Per selected (layer, head): keys whose mean attention over the query rows that see them exceeds `threshold` are
sinks; the first sink of each sequence (normally its first real token) is kept; every other sink's probability is
scaled by `beta` and the freed mass goes back to the remaining keys in proportion. The README's section "What ACT
does here, exactly" gives the choices made where the authors' code is silent or broken (batches, padding, KV-cache
decoding, GQA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import reference
from ..kernels.act import ColumnStats, act_attention
from .base import TEXT_FAMILIES, AttentionCall, Method, register_method
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
        self._history: dict[int, ColumnStats] = {}
        self._last_key: dict[int, torch.Tensor] = {}
        self.last_sinks: dict[int, torch.Tensor] = {}  # layer -> [B, H_selected, Lk] bool, from the latest call

    def layers(self) -> set[int]:
        return set(self.heads)

    def selected_heads(self) -> dict[int, list[int]]:
        return {layer: list(heads) for layer, heads in sorted(self.heads.items())}

    def column_stats(self) -> dict[int, ColumnStats]:
        """layer -> running column statistic of its selected heads (the heads of `self.heads[layer]`, in order)."""
        return dict(self._history)

    def reset(self) -> None:
        self._history.clear()
        self._last_key.clear()
        self.last_sinks.clear()

    def _history_for(self, call: AttentionCall) -> ColumnStats | None:
        """The running statistic this call continues, checked against the cache it comes with."""
        if call.past_length == 0:
            return None
        if call.cache_kind != "dynamic":
            raise NotImplementedError(
                "attnpatch act: decoding with this cache type is not supported (its key order is not the token "
                "order); use the default DynamicCache (generate(..., cache_implementation='dynamic'))."
            )
        history = self._history.get(call.layer)
        batch = call.query.shape[0]
        if history is None or history.colsum.shape[-1] != call.past_length or history.colsum.shape[0] != batch:
            seen = None if history is None else tuple(history.colsum.shape)
            raise RuntimeError(
                f"attnpatch act: the sink statistic of layer {call.layer} is out of step with the KV cache "
                f"(cache holds {call.past_length} tokens for batch {batch}, statistic shape {seen}); "
                "start the sequence again without a cache, or call patch.reset() before a new one."
            )
        # a reordered cache (beam search) reorders every layer: checking the first calibrated one is enough, and the
        # comparison reads back from the GPU, so once per step rather than once per layer
        last = self._last_key.get(call.layer) if call.layer == self._check_layer else None
        index = call.past_length - 1 - call.key_offset
        if last is not None and 0 <= index < call.key.shape[2] and not torch.equal(last, call.key[:, :, index]):
            raise RuntimeError(
                "attnpatch act: the KV cache rows were reordered (beam search, contrastive search): ACT's "
                "per-sequence sink statistic cannot follow that; use greedy decoding or sampling (num_beams=1)."
            )
        return history

    def remember(self, call: AttentionCall, stats: ColumnStats, sinks: torch.Tensor) -> None:
        """Keep a call's running statistic for the next step, and its sinks."""
        self._history[call.layer] = stats
        if call.layer == self._check_layer:
            self._last_key[call.layer] = call.key[:, :, -1].clone()
        self.last_sinks[call.layer] = sinks

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        heads = self._head_index.get(call.layer)
        if heads is None:
            return None
        if call.dropout > 0:
            raise RuntimeError("attnpatch act is an inference-time method: call model.eval() (dropout is active).")
        cfg = self.config
        q, k = call.query, call.key
        hq, hkv = q.shape[1], k.shape[1]
        every_head = len(heads) == hq
        result = act_attention(
            q if every_head else q[:, heads.to(q.device)],
            k,
            call.value,
            scale=call.scale,
            beta=cfg.beta,
            threshold=cfg.threshold,
            keep_first_sink=cfg.keep_first_sink,
            min_visible_rows=cfg.min_visible_rows,
            mask=call.mask,
            causal=call.causal,
            sliding_window=call.sliding_window,
            softcap=call.softcap,
            query_valid=call.query_valid,
            kv_head_index=heads // (hq // hkv),
            history=self._history_for(call),
            key_offset=call.key_offset,
            return_probs=call.output_attentions,
            mask_memo=call.mask_memo,
        )
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
