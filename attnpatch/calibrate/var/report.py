"""What VAR calibration reports: the result dataclasses (`SinkDimReport`, one `DimStats` per sink dimension) with
their JSON dict and text summary, the statistics of phi on sink vs ordinary tokens, the suggested tau and the
warnings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

EPS = 1e-6  # floor of the gap's lower end in the suggested tau
# share of the (sink token, layer) pairs with a massive activation that phi on the chosen dims may miss without a
# warning: late-layer sinks can carry the dims every token carries there instead (seen on Qwen2.5-Coder-0.5B, 1.2%)
MISSED_WARNING = 0.05


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
