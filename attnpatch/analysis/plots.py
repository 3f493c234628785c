"""Pictures of a `SinkAnalysis` (needs matplotlib: `pip install 'attnpatch[viz]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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
