"""Pictures of the analyses (needs matplotlib: `pip install 'attnpatch[viz]'`): sink heatmap, head importance,
distance profiles and trend, pattern clusters. Every function draws on a new Agg figure and returns it; `path`
saves a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .distance import DistanceProfile
    from .head_importance import HeadImportance
    from .pattern_clusters import PatternSummary
    from .sink_stats import SinkAnalysis

VMIN = 1e-3  # the colour scale is logarithmic from here to 1


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("attnpatch plots need matplotlib: pip install 'attnpatch[viz]'") from exc
    return matplotlib


def _label(text: str) -> str:
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def sink_heatmap(
    analysis: SinkAnalysis,
    sequence: int = 0,
    path: str | Path | None = None,
    ax: Axes | None = None,
    *,
    reduce: str = "max",
    dpi: int = 100,
) -> Figure:
    """[layers x key positions] heatmap of one sequence's column mean, reduced over heads ("max" or "mean"), on a
    log colour scale; x ticks are the token texts (or padded-row positions without a tokenizer). Pad positions are
    left out. A red x marks a key that is a hidden sink in some head of the layer, a black circle one that is a
    first sink. Draws on `ax` when given, else on a new figure sized to the data; saves a PNG (Agg) to `path`."""
    _matplotlib()
    from matplotlib.colors import LogNorm

    if not 0 <= sequence < analysis.input_ids.shape[0]:
        raise ValueError(f"sequence {sequence} is out of range; the analysis has {analysis.input_ids.shape[0]}")
    positions = analysis.attention_mask[sequence].bool().nonzero().flatten()
    values = analysis.layer_map(reduce)[:, sequence][:, positions].clamp_min(VMIN).numpy()
    layers, width = values.shape
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        size = (min(max(6.0, 2.0 + 0.2 * width), 60.0), min(max(3.0, 1.5 + 0.3 * layers), 30.0))
        fig = Figure(figsize=size, dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    image = ax.imshow(values, aspect="auto", cmap="viridis", norm=LogNorm(vmin=VMIN, vmax=1.0), interpolation="none")
    for mask, style in (
        (analysis.hidden, dict(marker="x", color="red")),
        (analysis.first, dict(marker="o", facecolors="none", edgecolors="black")),
    ):
        ys, xs = mask.any(dim=1)[:, sequence][:, positions].nonzero(as_tuple=True)
        if len(xs):
            ax.scatter(xs.numpy(), ys.numpy(), s=18, linewidths=1.0, **style)
    if analysis.tokens is not None:
        labels = [_label(analysis.tokens[sequence][p]) for p in positions.tolist()]
    else:
        labels = [str(p) for p in positions.tolist()]
    ax.set_xticks(range(width), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(layers), [str(layer) for layer in analysis.layers], fontsize=7)
    ax.set_xlabel("key" if analysis.tokens is not None else "key position (padded row)")
    ax.set_ylabel("layer")
    ax.set_title(
        f"sequence {sequence}: {reduce} over heads of the column mean\n"
        f"x hidden sink, o first sink (in some head; column mean > {analysis.threshold})",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="column mean")
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _figure(size: tuple[float, float], dpi: int) -> Figure:
    """A new Agg-backed figure (no pyplot state, safe in threads and headless)."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path | None, dpi: int) -> Figure:
    """Save a PNG with a 256-colour palette (a third of the size, no visible change for these plots)."""
    if path is not None:
        from .report import compact_png

        fig.savefig(path, dpi=dpi, format="png")
        compact_png(path)
    return fig


def importance_heatmap(
    importance: HeadImportance, metrics: tuple[str, ...] | None = None, path: str | Path | None = None, *, dpi: int = 90
) -> Figure:
    """One [layer x head] heatmap per metric of a HeadImportance (default: accuracy drop, probability drop, flip
    rate and Taylor score, those computed); values are written in the cells when the grid is small."""
    from .head_importance import METRICS

    names = [m for m in (metrics or METRICS[:4]) if getattr(importance, m) is not None]
    layers, heads = len(importance.layers), max(importance.num_heads)
    fig = _figure((min(3.0 + 2.2 * heads, 6.0) * len(names) / 1.6 + 1.0, min(1.5 + 0.28 * layers, 9.0)), dpi)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    labels = {"accuracy_drop": "accuracy drop", "prob_drop": "true-class prob. drop", "flip_rate": "flip rate",
              "taylor": "Taylor |dL/dgate|"}  # fmt: skip
    for ax, name in zip(axes, names, strict=True):
        values = importance.metric(name).numpy()
        bound = max(abs(float(values.min())), abs(float(values.max())), 1e-12)
        signed = name != "taylor" and float(values.min()) < 0
        image = ax.imshow(values, aspect="auto", cmap="RdBu_r" if signed else "viridis",
                          vmin=-bound if signed else 0.0, vmax=bound, interpolation="none")  # fmt: skip
        if layers * heads <= 120:
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, f"{v:.2f}" if bound >= 0.05 else f"{v:.0e}", ha="center", va="center", fontsize=6,
                        color="white" if not signed and v < 0.6 * bound else "black")  # fmt: skip
        ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=7)
        ax.set_yticks(range(layers), [str(layer) for layer in importance.layers], fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(labels.get(name, name), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(
        f"head importance ({importance.task}, {importance.items} items; baseline accuracy "
        f"{importance.baseline_accuracy:.3f})",
        fontsize=10,
    )
    return _save(fig, path, dpi)


def _distance_axis(ax: Axes, profile: DistanceProfile) -> None:
    if profile.geometry.kind == "text":
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("token distance")
    else:
        ax.set_xlabel(f"patch distance ({profile.geometry.metric})")


def distance_profiles(
    profile: DistanceProfile, path: str | Path | None = None, *, value: str = "mass", dpi: int = 90
) -> Figure:
    """One panel per layer, one line per head: attention mass on the keys at each distance (`value` "mass"), or
    the average probability of one key at that distance ("density", log scale). Special keys (CLS, or the first
    token) are left out; their share is in the legend."""
    if value not in ("mass", "density"):
        raise ValueError(f"value must be 'mass' or 'density', got {value!r}")
    values = profile.mass if value == "mass" else profile.density()
    n = len(profile.layers)
    cols = min(n, 6)
    rows = -(-n // cols)
    fig = _figure((2.4 * cols + 0.6, 2.0 * rows + 0.6), dpi)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    x = profile.centres.numpy()
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        for h in range(profile.num_heads[i]):
            label = f"h{h} (sp {float(profile.special_mass[i, h]):.2f})"
            ax.plot(x, values[i, h].numpy(), marker=".", markersize=3, linewidth=1, label=label)
        _distance_axis(ax, profile)
        if value == "density":
            ax.set_yscale("log")
        mean = float(profile.mean_distance[i, : profile.num_heads[i]].mean())
        ax.set_title(f"layer {profile.layers[i]}: mean distance {mean:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_fontsize(7)
        if profile.num_heads[i] <= 8:
            ax.legend(fontsize=5, loc="upper right", frameon=False)
    for ax in axes[:, 0]:
        ax.set_ylabel("attention mass" if value == "mass" else "probability per key", fontsize=7)
    kind = "CLS/registers" if profile.geometry.kind == "image" else "first token(s)"
    what = "attention mass by distance" if value == "mass" else "average probability of a key at each distance"
    fig.suptitle(f"{what} (sp = mass on {kind}, excluded)", fontsize=10)
    return _save(fig, path, dpi)


def distance_trend(profile: DistanceProfile, path: str | Path | None = None, *, dpi: int = 90) -> Figure:
    """Mean attention distance of every head against its layer (dots) with the layer mean (line), and the mass on
    the special tokens per layer."""
    fig = _figure((8.5, 3.2), dpi)
    left, right = fig.subplots(1, 2)
    trend = profile.layer_trend()
    for i, layer in enumerate(profile.layers):
        n = profile.num_heads[i]
        left.scatter([layer] * n, profile.mean_distance[i, :n].numpy(), s=14, alpha=0.7, color="tab:blue")
    left.plot(profile.layers, trend["mean"], color="black", linewidth=1, label="mean over heads")
    left.plot(profile.layers, trend["uniform"], color="gray", linewidth=1, linestyle="--", label="uniform attention")
    unit = "patches" if profile.geometry.kind == "image" else "tokens"
    left.set(xlabel="layer", ylabel=f"mean attention distance ({unit})", title="attention distance by layer")
    left.legend(fontsize=7)
    special = profile.special_mass.numpy()
    for i, layer in enumerate(profile.layers):
        n = profile.num_heads[i]
        right.scatter([layer] * n, special[i, :n], s=14, alpha=0.7, color="tab:red")
    right.plot(profile.layers, trend["special_mass"], color="black", linewidth=1)
    kind = "CLS/registers" if profile.geometry.kind == "image" else "first token(s)"
    right.set(xlabel="layer", ylabel="attention mass", title=f"mass on {kind}", ylim=(0, 1.02))
    for ax in (left, right):
        ax.title.set_fontsize(9)
    return _save(fig, path, dpi)


def _show_map(ax: Axes, summary: PatternSummary, values: np.ndarray) -> None:
    """An image map as a picture (query marked), a text map as bars (first column: the special tokens)."""
    geometry = summary.patterns.geometry
    if geometry.kind == "image":
        ax.imshow(values, cmap="magma", vmin=0.0, interpolation="nearest")
        ax.scatter([(values.shape[1] - 1) / 2], [(values.shape[0] - 1) / 2], marker="+", color="cyan", s=30)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    window = summary.patterns.window or 1
    row = values[0]
    offsets = np.arange(len(row) - 1) - (window - 1)
    ax.bar(offsets, row[1:], width=1.0, color="tab:blue")
    ax.bar([offsets[0] - 2], [row[0]], width=1.5, color="tab:red")
    ax.set_ylim(0, 1.05)
    ax.tick_params(labelsize=6)


def pattern_gallery(summary: PatternSummary, path: str | Path | None = None, *, dpi: int = 90) -> Figure:
    """Per cluster: the mean (max-scaled) map and the map nearest its centroid, with the cluster size and the heads
    it dominates."""
    k = summary.clusters
    cols = min(k, 8)
    rows = 2 * -(-k // cols)
    fig = _figure((1.6 * cols + 0.4, 1.55 * rows + 0.5), dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    x = summary.patterns.maps
    scaled = (x.flatten(1) / x.flatten(1).amax(-1, keepdim=True)).reshape(x.shape)
    sizes = summary.sizes()
    dominant = summary.dominant()
    for c in range(rows // 2 * cols):
        top, bottom = axes[2 * (c // cols), c % cols], axes[2 * (c // cols) + 1, c % cols]
        if c >= k:
            top.axis("off")
            bottom.axis("off")
            continue
        _show_map(top, summary, summary.representatives[c].numpy())
        _show_map(bottom, summary, scaled[int(summary.exemplars[c])].numpy())
        owners = sum(int((dominant[i, : summary.patterns.num_heads[layer]] == c).sum())
                     for i, layer in enumerate(summary.layers))  # fmt: skip
        top.set_title(f"cluster {c}: {sizes[c]} maps\nlead in {owners} heads", fontsize=7)
        bottom.set_title("nearest map", fontsize=6)
    where = "query at centre (+)" if summary.patterns.geometry.kind == "image" else "red: first token(s); x: offset"
    fig.suptitle(f"attention pattern clusters\n(autoencoder + k-means; mean map, {where})", fontsize=9)
    return _save(fig, path, dpi)


def pattern_histogram(summary: PatternSummary, path: str | Path | None = None, *, dpi: int = 90) -> Figure:
    """Each head's distribution over the pattern clusters ([layer, head] rows x clusters) and the latent space
    (PCA of the autoencoder codes) coloured by cluster."""
    heads = [(layer, h) for i, layer in enumerate(summary.layers) for h in range(summary.patterns.num_heads[layer])]
    hist = np.stack([summary.histogram[summary.layers.index(layer), h].numpy() for layer, h in heads])
    fig = _figure((9.0, min(2.0 + 0.13 * len(heads), 12.0)), dpi)
    left, right = fig.subplots(1, 2, width_ratios=[1.2, 1.0])
    image = left.imshow(hist, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="none")
    step = max(1, len(heads) // 40)
    left.set_yticks(range(0, len(heads), step), [f"L{layer}H{h}" for layer, h in heads[::step]], fontsize=6)
    left.set_xticks(range(summary.clusters), [str(c) for c in range(summary.clusters)], fontsize=7)
    left.set(xlabel="cluster", title="share of each head's maps per cluster")
    fig.colorbar(image, ax=left, shrink=0.6)
    emb = summary.embedding.numpy()
    sample = np.random.default_rng(0).permutation(len(emb))[:4000]
    right.scatter(emb[sample, 0], emb[sample, 1], c=summary.labels.numpy()[sample], cmap="tab10", s=3, alpha=0.6)
    for c in range(summary.clusters):
        centre = emb[summary.labels.numpy() == c].mean(0)
        right.text(centre[0], centre[1], str(c), fontsize=9, weight="bold")
    right.set(xlabel="PC 1", ylabel="PC 2", title="autoencoder latents (PCA)")
    for ax in (left, right):
        ax.title.set_fontsize(9)
    return _save(fig, path, dpi)
