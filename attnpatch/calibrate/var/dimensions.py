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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..integrations.structure import text_decoder_layers
from ..profiles import Profile, fingerprint
from .replay import StopForward, layer_input

EPS = 1e-6
# share of the (sink token, layer) pairs with a massive activation that phi on the chosen dims may miss without a
# warning: late-layer sinks can carry the dims every token carries there instead (seen on Qwen2.5-0.5B, 1.2%)
MISSED_WARNING = 0.05

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


# ---------------------------------------------------------------------------------------------------------------
# capture


def rms_ratios(x: torch.Tensor) -> torch.Tensor:
    """|x| / RMS(x) over the last dimension, in fp32, without a norm weight (VAR's statistic)."""
    x = x.float()
    return x.abs() / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


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
        r = rms_ratios(x)
        return (r if index is None else r[:, index.to(r.device)]).cpu()

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
        r = rms_ratios(x)
        token, dim = (r > tau).nonzero(as_tuple=True)
        max_value, max_dim = r.max(-1)
        norm = x.float().norm(dim=-1)
        tensors = (t.cpu() for t in (token, dim, r[token, dim], max_value, max_dim, norm))
        return _LayerStats(*tensors, hidden=r.shape[-1])

    return reduce


# ---------------------------------------------------------------------------------------------------------------
# report


@dataclass
class DimStats:
    """One sink dimension: where it fires, on which tokens, and how far sinks stand above ordinary tokens."""

    dim: int
    layers: list[int]  # layers where it is massive on a sink token in at least half of the prompts with sinks
    tokens: dict[str, int]  # "token@position" -> number of prompts where that sink token carries it
    consistency: float  # share of the (prompt, layer) pairs with a massive sink token where this dim is massive
    sink_median: float  # median ratio on the sink tokens carrying it, at its layers
    ordinary_median: float | None  # ratio on non-sink tokens, all layers >= min_layer
    ordinary_p99: float | None
    ordinary_max: float | None
    separation: float | None  # sink_median / ordinary_p99


@dataclass
class SinkDimReport:
    """What `discover_sink_dims` measured; `dims` is empty when no dimension marks sink tokens."""

    dims: list[int]
    tau: float
    min_layer: int
    num_layers: int
    hidden_size: int
    max_possible_ratio: float  # sqrt(hidden_size): all of a token's energy in one dimension
    prompts: int
    tokens: int
    dim_stats: list[DimStats] = field(default_factory=list)
    sink_tokens: dict[str, int] = field(default_factory=dict)  # "token@position" -> prompts
    prompts_with_sinks: int = 0
    phi: dict[str, float | None] = field(default_factory=dict)  # max over dims: sink vs ordinary statistics
    suggested_tau: float | None = None  # geometric mean of the gap (ordinary p99, sink median) on phi
    dense_dims: list[dict[str, Any]] = field(default_factory=list)  # dims massive on most tokens, with layers
    dropped: list[dict[str, Any]] = field(default_factory=list)  # candidates below min_separation: dim, separation
    largest: dict[str, Any] = field(default_factory=dict)  # largest ratio on a non-dense dimension
    first_token_norm_ratio: list[float | None] = field(default_factory=list)  # per layer: ||x_0|| / median ||x_t||
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line per dimension, then the warnings."""
        lines = [f"sink dims {self.dims} (tau {self.tau:g}, suggested {_fmt(self.suggested_tau)})"]
        for s in self.dim_stats:
            tokens = ", ".join(list(s.tokens)[:4])
            lines.append(
                f"  dim {s.dim}: layers {_span(s.layers)}, sink median {s.sink_median:.1f}, ordinary median "
                f"{_fmt(s.ordinary_median)} p99 {_fmt(s.ordinary_p99)}, separation {_fmt(s.separation)}; {tokens}"
            )
        return "\n".join(lines + [f"  warning: {w}" for w in self.warnings])

    def failure_message(self) -> str:
        """Why no sink dimension was found, and what to do."""
        largest = self.largest
        seen = (
            f"the largest ratio on a non-dense dimension was {largest['ratio']:.2f} (dim {largest['dim']}, token "
            f"{largest['token']}, layer {largest['layer']})"
            if largest
            else "no non-dense dimension had any ratio"
        )
        if self.dropped:
            weak = ", ".join(f"{d['dim']} (separation {d['separation']:.2f})" for d in self.dropped)
            reason = f"the dims massive on sink tokens are nearly as large on ordinary tokens: {weak}"
        else:
            reason = f"no dimension exceeds tau={self.tau:g} on the same tokens at most layers"
        dense = [f"{d['dim']} (layers {_span(d['layers'])})" for d in self.dense_dims]
        dense_note = f"; dims massive on most tokens, so no sink markers: {', '.join(dense)}" if dense else ""
        return (
            f"VAR calibration found no sink dimension: measured |x[d]| / RMS(x) on the residual stream entering "
            f"decoder layers {self.min_layer}..{self.num_layers - 1} over {self.prompts} prompts ({self.tokens} "
            f"tokens) at tau={self.tau:g}; {reason}; {seen} (the largest possible is sqrt(hidden_size) = "
            f"{self.max_possible_ratio:.1f}){dense_note}. VAR needs hidden dimensions with massive activations on "
            f"sink tokens; pass sink_dims=[...] (and tau) explicitly, or try another tau."
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _span(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(str(layer) for layer in layers)


def _quantiles(values: torch.Tensor) -> tuple[float | None, float | None, float | None]:
    """(median, p99, max) of a 1-D tensor, or Nones when empty."""
    if values.numel() == 0:
        return None, None, None
    v = values.double()
    return float(v.median()), float(torch.quantile(v, 0.99)), float(v.max())


# ---------------------------------------------------------------------------------------------------------------
# prompts


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


# ---------------------------------------------------------------------------------------------------------------
# discovery


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


def _phi_stats(sink_phi: torch.Tensor, ordinary_phi: torch.Tensor, tau: float) -> dict[str, float | None]:
    s_median, _, _ = _quantiles(sink_phi)
    o_median, o_p99, o_max = _quantiles(ordinary_phi)
    return {
        "sink_min": float(sink_phi.min()) if sink_phi.numel() else None,
        "sink_median": s_median,
        "sink_missed": float((sink_phi <= tau).double().mean()) if sink_phi.numel() else None,
        "ordinary_median": o_median,
        "ordinary_p99": o_p99,
        "ordinary_max": o_max,
        "ordinary_above_tau": float((ordinary_phi > tau).double().mean()) if ordinary_phi.numel() else None,
    }


def _tau_warnings(phi: dict[str, float | None], tau: float) -> list[str]:
    out = []
    if phi["sink_missed"] and phi["sink_missed"] > MISSED_WARNING:
        out.append(
            f"the sink dims miss {100 * phi['sink_missed']:.1f}% of the (sink token, layer) pairs where a sink is "
            f"massive: phi falls to {phi['sink_min']:.2f} <= tau {tau:g} there"
        )
    if phi["ordinary_p99"] is not None and phi["ordinary_p99"] >= tau:
        out.append(f"tau {tau:g} does not separate: ordinary tokens reach phi p99 {phi['ordinary_p99']:.2f}")
    elif phi["ordinary_above_tau"]:
        out.append(
            f"{100 * phi['ordinary_above_tau']:.2f}% of ordinary (token, layer) pairs exceed tau {tau:g} "
            f"(max {phi['ordinary_max']:.2f}) and would be taken for sinks"
        )
    return out


def _suggested_tau(phi: dict[str, float | None]) -> float | None:
    """Geometric mean of the typical gap (ordinary p99, sink median), when there is one."""
    low, high = phi["ordinary_p99"], phi["sink_median"]
    if low is None or high is None or high <= low:
        return None
    return math.sqrt(max(low, EPS) * high)


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


def _setup_warnings(report: SinkDimReport) -> list[str]:
    out = []
    if report.tau >= report.max_possible_ratio:
        out.append(
            f"tau {report.tau:g} >= sqrt(hidden_size) = {report.max_possible_ratio:.2f}, the largest possible "
            f"ratio: no token can exceed it"
        )
    if report.dense_dims:
        dims = ", ".join(f"{d['dim']} (layers {_span(d['layers'])})" for d in report.dense_dims)
        out.append(f"dims massive on most tokens (ignored at those layers, they cannot mark sinks): {dims}")
    if 2 * report.prompts_with_sinks < report.prompts:
        out.append(f"sink tokens in only {report.prompts_with_sinks} of {report.prompts} prompts: no sink dimension")
    return out


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
