"""The whole attention analysis of one model, written as PNG figures, summary.json and one HTML report:
head importance, distance profiles and trend, pattern clusters, and (text models) the sink statistic."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import Geometry
from .distance import DistanceProfile, distance_profile
from .head_importance import HeadImportance, head_importance
from .pattern_clusters import PatternSummary, summarize_patterns
from .patterns import collect_patterns
from .report import Section, compact_png, find_chromium, write_html
from .report import screenshot as take_screenshot


@dataclass
class AnalysisResult:
    """What `analyze_vision` / `analyze_text` computed and wrote (`figures`: name -> PNG path)."""

    out_dir: Path
    html: Path
    summary: dict[str, Any]
    importance: HeadImportance
    profile: DistanceProfile
    patterns: PatternSummary
    sinks: Any = None
    figures: dict[str, Path] = field(default_factory=dict)


def _chunks(inputs: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(inputs.values())).shape[0]
    return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]


def _timed(seconds: dict[str, float], name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds[name] = round(time.perf_counter() - start, 2)
    return result


def _layer_rows(profile: DistanceProfile, importance: HeadImportance, patterns: PatternSummary) -> list[dict]:
    trend = profile.layer_trend()
    rows = []
    for i, layer in enumerate(profile.layers):
        n = profile.num_heads[i]
        peaks = profile.peak_distance("density")[i, :n].tolist()
        rows.append({
            "layer": layer,
            "mean distance (heads: mean)": trend["mean"][i],
            "min": trend["min"][i],
            "uniform": trend["uniform"][i],
            "max": trend["max"][i],
            "densest distance per head": ", ".join(f"{p:g}" for p in peaks),
            "special mass": trend["special_mass"][i],
            "accuracy drop (max head)": float(importance.accuracy_drop[i, :n].max()),
            "dominant clusters": ", ".join(str(c) for c in patterns.dominant()[i, :n].tolist()),
        })  # fmt: skip
    return rows


def _sections(result: AnalysisResult, task_note: str) -> list[Section]:
    imp, prof, pat, fig = result.importance, result.profile, result.patterns, result.figures
    ranking = []
    for rank, row in enumerate(imp.ranking("prob_drop", top=12), start=1):
        layer, head = row["layer"], row["head"]
        ranking.append({
            "rank": rank, "layer": layer, "head": head, "prob. drop": row["value"],
            "accuracy drop": float(imp.accuracy_drop[layer, head]), "flip rate": float(imp.flip_rate[layer, head]),
            "taylor": float(imp.taylor[layer, head]) if imp.taylor is not None else "",
        })  # fmt: skip
    sections = [
        Section(
            "Head importance (pruning)",
            f"Each head removed alone (its output slice gated to 0 before the output projection, no weight change); "
            f"{task_note}. Taylor: mean over examples of |d loss / d gate| at gate 1 (Michel et al. 2019).",
            [(fig["importance"], "per (layer, head): accuracy drop, probability drop, flip rate, Taylor score")],
            [("most important heads by drop in true-class (next-token) probability", ranking)],
        ),
        Section(
            "Attention distance",
            "Attention mass of each query on keys at each distance (patch grid for images, tokens for text), averaged "
            "over query rows, streamed block by block from q and k; special tokens (CLS, or the first token of a "
            "text) are reported apart. Mean distance: attention-weighted over non-special keys.",
            [
                (fig["distance_profiles"], "mass by distance, one panel per layer, one line per head"),
                (fig["distance_density"], "average probability of one key at each distance (mass / keys there)"),
                (fig["distance_trend"], "mean attention distance of each head by layer; mass on special tokens"),
            ],
            [("per layer", _layer_rows(prof, imp, pat))],
        ),  # fmt: skip
        Section(
            "Attention patterns",
            f"{len(pat.labels)} per-query maps re-centred on the query, scaled to max 1, embedded by an autoencoder "
            f"(reconstruction MSE {pat.loss:.4f}) and clustered by k-means into {pat.clusters} clusters "
            f"(sizes {pat.sizes()}).",
            [
                (fig["pattern_gallery"], "mean map of each cluster (top) and the map nearest its centroid (bottom)"),
                (fig["pattern_histogram"], "each head's share of maps per cluster; latent space"),
            ],
        ),  # fmt: skip
    ]
    if result.sinks is not None:
        summary = result.sinks.summary()
        sections.append(
            Section(
                "Attention sinks",
                "ACT's sink statistic (mean attention a key receives from the rows that see it) for every (layer, "
                f"head), threshold {result.sinks.threshold}: {summary['sinks']} sinks, {summary['first_sinks']} "
                f"first, {summary['hidden_sinks']} hidden; hidden sinks by token class {summary['hidden_by_class']}.",
                [(fig["sinks"], "max over heads of the column mean, first sequence")],
            )
        )
    return sections


def _figures(result: AnalysisResult) -> None:
    from . import plots

    out = result.out_dir
    specs = {
        "importance": (plots.importance_heatmap, result.importance),
        "distance_profiles": (plots.distance_profiles, result.profile),
        "distance_density": (functools.partial(plots.distance_profiles, value="density"), result.profile),
        "distance_trend": (plots.distance_trend, result.profile),
        "pattern_gallery": (plots.pattern_gallery, result.patterns),
        "pattern_histogram": (plots.pattern_histogram, result.patterns),
    }
    if result.sinks is not None:
        specs["sinks"] = (plots.sink_heatmap, result.sinks)
    for name, (fn, data) in specs.items():
        path = out / f"{name}.png"
        fn(data, path=path)
        result.figures[name] = compact_png(path)  # (sink_heatmap saves full colour)


def _finish(
    result: AnalysisResult, title: str, meta: dict[str, Any], task_note: str, screenshot: bool, screenshot_height: int
) -> None:
    _figures(result)
    result.summary.update(
        {
            "meta": meta,
            "importance": result.importance.to_dict(),
            "distance": result.profile.to_dict(),
            "patterns": result.patterns.to_dict(),
        }
    )
    if result.sinks is not None:
        result.summary["sinks"] = result.sinks.summary()
    (result.out_dir / "summary.json").write_text(json.dumps(result.summary, indent=1, default=str))
    write_html(result.html, title, _sections(result, task_note), meta)
    if screenshot and find_chromium() is not None:
        take_screenshot(result.html, result.out_dir / "report_screenshot.png", width=1200, height=screenshot_height)


def analyze_vision(
    model: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | Path,
    *,
    geometry: Geometry | None = None,
    profile_images: int = 256,
    pattern_images: int = 64,
    queries: int = 8,
    clusters: int = 8,
    ae_steps: int = 1500,
    taylor: bool = True,
    batch_size: int = 250,
    max_batch: int = 250,
    name: str = "vision model",
    screenshot: bool = False,
) -> AnalysisResult:
    """Analyse an image classifier (HF ViT family: CLS first, then the patch grid) on labelled images."""
    geometry = geometry or Geometry("image", prefix=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    batches = _chunks({"pixel_values": pixel_values, "labels": labels}, batch_size)
    imp = _timed(seconds, "importance", head_importance, model, batches, max_batch=max_batch, taylor=taylor)
    images = _chunks({"pixel_values": pixel_values[:profile_images]}, batch_size)
    prof = _timed(seconds, "distance", distance_profile, model, images, geometry)
    few = {"pixel_values": pixel_values[:pattern_images]}
    maps = _timed(seconds, "collect_patterns", collect_patterns, model, few, geometry, queries=queries)
    summary = _timed(seconds, "summarize_patterns", summarize_patterns, maps, clusters=clusters, steps=ae_steps)
    result = AnalysisResult(out, out / "report.html", {"seconds": seconds}, imp, prof, summary)
    meta = {
        "model": name,
        "images (importance)": len(pixel_values),
        "images (distance)": min(profile_images, len(pixel_values)),
        "images x queries (patterns)": f"{min(pattern_images, len(pixel_values))} x {queries}",
        "seconds": seconds,
    }
    _finish(result, f"Attention analysis: {name}", meta, f"{imp.items} test images, top-1 accuracy", screenshot, 3300)
    return result


def analyze_text(
    model: nn.Module,
    tokenizer: Any,
    inputs: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    score_last: int | None = 32,
    queries: int = 16,
    window: int = 32,
    clusters: int = 8,
    ae_steps: int = 1500,
    taylor: bool = True,
    batch_size: int = 4,
    max_batch: int = 16,
    sink_tokens: int = 48,
    name: str = "language model",
    screenshot: bool = False,
) -> AnalysisResult:
    """Analyse a causal LM on token windows {"input_ids", "attention_mask"} [n, T] (next-token prediction)."""
    geometry = Geometry("text", prefix=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    batches = _chunks(inputs, batch_size)
    imp = _timed(
        seconds, "importance", head_importance, model, batches, task="next-token", max_batch=max_batch,
        taylor=taylor, score_last=score_last,
    )  # fmt: skip
    prof = _timed(seconds, "distance", distance_profile, model, batches, geometry)
    maps = _timed(
        seconds, "collect_patterns", collect_patterns, model, batches, geometry, queries=queries, window=window
    )
    summary = _timed(seconds, "summarize_patterns", summarize_patterns, maps, clusters=clusters, steps=ae_steps)
    from .sink_stats import sinks

    head = {k: v[:, :sink_tokens] for k, v in inputs.items()}
    found = _timed(seconds, "sinks", sinks, model, head, tokenizer=tokenizer)
    result = AnalysisResult(out, out / "report.html", {"seconds": seconds}, imp, prof, summary, sinks=found)
    n, t = inputs["input_ids"].shape
    meta = {
        "model": name,
        "sequences x tokens": f"{n} x {t}",
        "scored next-token predictions (importance)": imp.items,
        "queries per sequence and layer (patterns)": queries,
        "seconds": seconds,
    }
    note = f"{imp.items} next-token predictions (the last {score_last} of each window), top-1 accuracy"
    _finish(result, f"Attention analysis: {name}", meta, note, screenshot, 5600)
    return result
