"""VAR sink-dimension discovery: the hidden dimensions whose massive activations mark sink tokens.

VAR (Kang et al., ICLR 2025) calls token t a sink at decoder layer i when phi(x_t) = max_{d in D_sink} |x_t[d]| /
RMS(x_t) > tau on the residual stream x entering layer i (before its input norm; RMS in fp32 without the norm weight,
eps 1e-6), for layers i >= 2. This module finds D_sink for a model from a few text prompts:

1. pass 1 records, per (prompt, layer >= min_layer, token), the dimensions with ratio > tau ("massive");
2. a dimension massive on at least `dense_fraction` of all tokens at a layer is *dense* there (a residual-stream
   direction every token carries, e.g. Gemma-3): it cannot tell sinks apart and is ignored at that layer;
3. sink tokens: tokens with a non-dense massive dimension at >= `sink_layer_fraction` of the layers;
4. candidates: the dimensions massive on a sink token in >= `consistency` of the (prompt, layer) pairs that have a
   massive sink token, provided sink tokens occur in at least half of the prompts; strongest first;
5. pass 2 measures the ratio on the candidates for every token; a candidate whose separation (median on the sink
   tokens carrying it / p99 on ordinary tokens) is below `min_separation` is dropped; the rest, at most `max_dims`,
   are the sink dimensions. The report gives sink vs ordinary statistics of phi, warnings when tau does not separate
   them, and a suggested tau at the geometric mean of the gap (ordinary p99, sink median).

The largest possible ratio is sqrt(hidden_size) (all energy in one dimension), so tau = 20 is near the ceiling of
small models (25.3 for hidden 640, 29.9 for hidden 896) while it is 0.31 of it for a 7B model (hidden 4096).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...api import runs_unpatched
from ...integrations.structure import text_decoder_layers
from ...profiles import Profile, fingerprint
from .capture import _LayerStats, _massive_reducer, _Prompt, _prompts, capture_layer_inputs, layer_input_ratios
from .report import DimStats, SinkDimReport, _phi_stats, _quantiles, _setup_warnings, _suggested_tau, _tau_warnings


@dataclass
class _Pass1:
    stats: list[dict[int, _LayerStats]]  # per prompt
    layers: list[int]
    dense: dict[int, set[int]]  # layer -> dense dims
    sinks: list[dict[int, list[int]]]  # per prompt: sink position -> layers where it is massive (non-dense)


def _dense_dims(stats: list[dict[int, _LayerStats]], layers: list[int], fraction: float) -> dict[int, set[int]]:
    """Per layer, the dims massive on at least `fraction` of all tokens (of all prompts)."""
    total = sum(s[layers[0]].max_value.numel() for s in stats)
    hidden = stats[0][layers[0]].hidden
    dense = {}
    for layer in layers:
        counts = sum(torch.bincount(s[layer].dim, minlength=hidden) for s in stats)
        dense[layer] = {int(d) for d in (counts >= fraction * total).nonzero().flatten()}
    return dense


def _massive(st: _LayerStats, dense: set[int]) -> list[tuple[int, int, float]]:
    """(token, dim, ratio) of the massive entries on non-dense dims."""
    return [
        (t, d, v)
        for t, d, v in zip(st.token.tolist(), st.dim.tolist(), st.value.tolist(), strict=True)
        if d not in dense
    ]


def _sink_tokens(stats: dict[int, _LayerStats], dense: dict[int, set[int]], fraction: float) -> dict[int, list[int]]:
    """Tokens massive (on a non-dense dim) at >= `fraction` of the layers -> those layers."""
    hits: dict[int, list[int]] = {}
    for layer in sorted(stats):
        for t in sorted({t for t, _, _ in _massive(stats[layer], dense[layer])}):
            hits.setdefault(t, []).append(layer)
    return {t: layers for t, layers in sorted(hits.items()) if len(layers) >= fraction * len(stats)}


def _pass1(model, prompts, tau, min_layer, dense_fraction, sink_layer_fraction) -> _Pass1:
    reduce = _massive_reducer(tau)
    stats = [capture_layer_inputs(model, p.ids, None, reduce, min_layer) for p in prompts]
    layers = sorted(stats[0])
    dense = _dense_dims(stats, layers, dense_fraction)
    sinks = [_sink_tokens(s, dense, sink_layer_fraction) for s in stats]
    return _Pass1(stats, layers, dense, sinks)


@dataclass
class _Candidate:
    pairs: int = 0  # (prompt, layer) pairs where it is massive on a sink token
    values: list[float] = field(default_factory=list)  # its massive ratios on sink tokens
    layer_prompts: Counter = field(default_factory=Counter)  # layer -> prompts
    carriers: dict[int, set[int]] = field(default_factory=dict)  # prompt -> sink positions carrying it

    @property
    def strength(self) -> float:
        return float(torch.tensor(self.values).double().median())


def _candidates(p1: _Pass1) -> tuple[dict[int, _Candidate], int]:
    """Dims massive on sink tokens, and the number of (prompt, layer) pairs with a massive sink token."""
    found: dict[int, _Candidate] = {}
    pairs = 0
    for i, (stats, sinks) in enumerate(zip(p1.stats, p1.sinks, strict=True)):
        for layer in p1.layers:
            entries = [(t, d, v) for t, d, v in _massive(stats[layer], p1.dense[layer]) if t in sinks]
            pairs += bool(entries)
            for d in {d for _, d, _ in entries}:
                c = found.setdefault(d, _Candidate())
                c.pairs += 1
                c.layer_prompts[layer] += 1
            for t, d, v in entries:
                found[d].values.append(v)
                found[d].carriers.setdefault(i, set()).add(t)
    return found, pairs


def _select(found: dict[int, _Candidate], pairs: int, consistency: float) -> list[int]:
    """The consistent candidates, strongest first."""
    kept = [d for d, c in found.items() if pairs and c.pairs >= consistency * pairs]
    return sorted(kept, key=lambda d: -found[d].strength)


@dataclass
class _Pass2:
    """Ratios on the candidate dims [T, k] per (prompt, layer), and the sink / ordinary token masks."""

    dims: list[int]
    ratios: list[dict[int, torch.Tensor]]  # per prompt: layer -> [T, k]
    ordinary: list[torch.Tensor]  # per prompt: [T] bool, not a sink token


def _pass2(model, prompts: list[_Prompt], p1: _Pass1, dims: list[int]) -> _Pass2:
    ratios, ordinary = [], []
    for prompt, sinks in zip(prompts, p1.sinks, strict=True):
        ratios.append(layer_input_ratios(model, prompt.ids, min_layer=p1.layers[0], dims=dims))
        mask = torch.ones(prompt.ids.numel(), dtype=torch.bool)
        mask[list(sinks)] = False
        ordinary.append(mask)
    return _Pass2(dims, ratios, ordinary)


def _cat(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(values) if values else torch.zeros(0)


def _dim_values(p1: _Pass1, p2: _Pass2, d: int, c: _Candidate) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratios of dim d on the sink tokens carrying it (at the layers where they are massive) and on ordinary
    tokens (all layers)."""
    j = p2.dims.index(d)
    sink, ordinary = [], []
    for i, (ratios, mask) in enumerate(zip(p2.ratios, p2.ordinary, strict=True)):
        for layer, r in ratios.items():
            ordinary.append(r[mask, j])
            sink.append(r[[t for t in sorted(c.carriers.get(i, ())) if layer in p1.sinks[i][t]], j])
    return _cat(sink), _cat(ordinary)


def _phi_values(p1: _Pass1, p2: _Pass2, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """phi (max over `dims`) on sink tokens at the layers where they are massive, and on ordinary tokens."""
    cols = [p2.dims.index(d) for d in dims]
    sink, ordinary = [], []
    for sinks, ratios, mask in zip(p1.sinks, p2.ratios, p2.ordinary, strict=True):
        for layer, r in ratios.items():
            phi = r[:, cols].max(-1).values
            ordinary.append(phi[mask])
            sink.append(phi[[t for t, layers in sinks.items() if layer in layers]])
    return _cat(sink), _cat(ordinary)


def _dim_stats(d: int, c: _Candidate, pairs: int, values: tuple[torch.Tensor, torch.Tensor], fire: list[int],
               prompts: list[_Prompt]) -> DimStats:  # fmt: skip
    sink_median, _, _ = _quantiles(values[0])
    o_median, o_p99, o_max = _quantiles(values[1])
    sink_median = c.strength if sink_median is None else sink_median
    tokens = Counter(prompts[i].labels[t] for i, ts in c.carriers.items() for t in ts)
    return DimStats(
        dim=d,
        layers=fire,
        tokens=dict(tokens.most_common()),
        consistency=c.pairs / pairs,
        sink_median=sink_median,
        ordinary_median=o_median,
        ordinary_p99=o_p99,
        ordinary_max=o_max,
        separation=None if not o_p99 else sink_median / o_p99,
    )


def _dense_report(dense: dict[int, set[int]]) -> list[dict[str, Any]]:
    by_dim: dict[int, list[int]] = {}
    for layer, dims in sorted(dense.items()):
        for d in dims:
            by_dim.setdefault(d, []).append(layer)
    return [{"dim": d, "layers": layers} for d, layers in sorted(by_dim.items(), key=lambda kv: -len(kv[1]))]


def _largest(p1: _Pass1, prompts: list[_Prompt]) -> dict[str, Any]:
    """The largest ratio on a dimension that is not dense at its layer."""
    best: dict[str, Any] = {}
    for prompt, stats in zip(prompts, p1.stats, strict=True):
        for layer, st in stats.items():
            for t, (v, d) in enumerate(zip(st.max_value.tolist(), st.max_dim.tolist(), strict=True)):
                if d not in p1.dense[layer] and v > best.get("ratio", -1.0):
                    best = {"ratio": v, "dim": d, "layer": layer, "token": prompt.labels[t]}
    return best


def _norm_ratios(p1: _Pass1) -> list[float | None]:
    """Per layer, the median over prompts of the first token's norm over the median norm of the others."""
    out = []
    for layer in p1.layers:
        ratios = [s[layer].norm[0] / s[layer].norm[1:].median() for s in p1.stats if s[layer].norm.numel() > 1]
        out.append(float(torch.stack(ratios).median()) if ratios else None)
    return out


def discover_sink_dims(
    model: nn.Module,
    tokenizer: Any = None,
    texts: Sequence[Any] | None = None,
    *,
    tau: float = 20.0,
    min_layer: int = 2,
    max_dims: int = 8,
    consistency: float = 0.5,
    sink_layer_fraction: float = 0.5,
    dense_fraction: float = 0.5,
    min_separation: float = 1.5,
) -> SinkDimReport:
    """Find the hidden dimensions whose massive activations (|x[d]| / RMS(x) > tau) mark sink tokens.

    texts: strings (tokenised with the tokenizer's default special tokens, so BOS is there if the model uses one),
    token-id lists/tensors (tokenizer may be None), or None for `DEFAULT_TEXTS`. Prompts run one at a time, twice
    (pass 1 keeps only the massive entries, pass 2 the candidate dims). See the module docstring for the rule and
    its options.
    """
    started = time.perf_counter()
    prompts = _prompts(tokenizer, texts)
    layers_all = text_decoder_layers(model)
    if not 0 <= min_layer < len(layers_all):
        raise ValueError(f"min_layer must be in [0, {len(layers_all) - 1}], got {min_layer}")
    p1 = _pass1(model, prompts, tau, min_layer, dense_fraction, sink_layer_fraction)
    hidden = p1.stats[0][p1.layers[0]].hidden
    report = SinkDimReport(
        dims=[],
        tau=float(tau),
        min_layer=min_layer,
        num_layers=len(layers_all),
        hidden_size=hidden,
        max_possible_ratio=math.sqrt(hidden),
        prompts=len(prompts),
        tokens=sum(p.ids.numel() for p in prompts),
        sink_tokens=_sink_labels(prompts, p1),
        prompts_with_sinks=sum(bool(s) for s in p1.sinks),
        dense_dims=_dense_report(p1.dense),
        largest=_largest(p1, prompts),
        first_token_norm_ratio=_norm_ratios(p1),
    )
    report.warnings += _setup_warnings(report)
    if 2 * report.prompts_with_sinks >= report.prompts:
        options = dict(consistency=consistency, max_dims=max_dims, min_separation=min_separation)
        _fill_dims(report, model, prompts, p1, options)
    report.seconds = time.perf_counter() - started
    return report


def _sink_labels(prompts: list[_Prompt], p1: _Pass1) -> dict[str, int]:
    labels = Counter(p.labels[t] for p, sinks in zip(prompts, p1.sinks, strict=True) for t in sinks)
    return dict(labels.most_common())


def _fill_dims(report: SinkDimReport, model, prompts, p1: _Pass1, options: dict[str, float]) -> None:
    found, pairs = _candidates(p1)
    candidates = _select(found, pairs, options["consistency"])[: 4 * int(options["max_dims"])]
    if not candidates:
        return
    half = report.prompts_with_sinks / 2
    fire = {d: sorted(layer for layer, n in found[d].layer_prompts.items() if n >= half) for d in candidates}
    p2 = _pass2(model, prompts, p1, candidates)
    stats = [_dim_stats(d, found[d], pairs, _dim_values(p1, p2, d, found[d]), fire[d], prompts) for d in candidates]
    weak = [s for s in stats if s.separation is not None and s.separation < options["min_separation"]]
    report.dropped = [{"dim": s.dim, "separation": s.separation} for s in weak]
    if weak:
        report.warnings.append(
            "dims massive on sink tokens but also on ordinary ones (separation = sink median / ordinary p99 below "
            f"{options['min_separation']:g}), dropped: " + ", ".join(f"{s.dim} ({s.separation:.2f})" for s in weak)
        )
    report.dim_stats = [s for s in stats if s not in weak][: int(options["max_dims"])]
    report.dims = [s.dim for s in report.dim_stats]
    if report.dims:
        report.phi = _phi_stats(*_phi_values(p1, p2, report.dims), report.tau)
        report.suggested_tau = _suggested_tau(report.phi)
        report.warnings += _tau_warnings(report.phi, report.tau)


@runs_unpatched
def calibrate_var(
    model: nn.Module, tokenizer: Any = None, texts: Sequence[Any] | None = None, *, tau: float = 20.0, **options: Any
) -> Profile:
    """Discover VAR's sink dimensions (see `discover_sink_dims`, whose options are accepted) and return a Profile
    with options {"sink_dims", "tau"}; raises ValueError when no dimension marks sink tokens."""
    report = discover_sink_dims(model, tokenizer, texts, tau=tau, **options)
    if not report.dims:
        raise ValueError(report.failure_message())
    metadata = {**report.to_dict(), "texts": report.prompts, "seconds": report.seconds}
    return Profile(
        method="var",
        options={"sink_dims": list(report.dims), "tau": float(tau)},
        heads={},
        fingerprint=fingerprint(model),
        metadata=metadata,
    )
