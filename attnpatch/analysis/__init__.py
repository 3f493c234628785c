"""Attention analysis: where the sinks are (`sinks`, `SinkAnalysis`), which heads matter (`head_importance`), how far
heads look (`distance_profile`), which patterns they draw (`collect_patterns`, `summarize_patterns`), pictures of
each (`plots`) and the whole report of a model (`analyze_vision`, `analyze_text`)."""

from .capture import Geometry, probability_blocks
from .distance import DistanceAccumulator, DistanceProfile, distance_profile
from .head_importance import HeadImportance, head_importance
from .pattern_clusters import PatternAutoencoder, PatternSummary, summarize_patterns
from .patterns import PatternCollector, PatternSet, collect_patterns
from .plots import (
    distance_profiles,
    distance_trend,
    importance_heatmap,
    pattern_gallery,
    pattern_histogram,
    sink_heatmap,
)
from .report import Section, render_html, screenshot, write_html
from .run import AnalysisResult, analyze_text, analyze_vision
from .sink_stats import TOKEN_CLASSES, SinkAnalysis, SinkReport, classify_tokens, find_sinks, sinks

__all__ = [
    "TOKEN_CLASSES",
    "AnalysisResult",
    "DistanceAccumulator",
    "DistanceProfile",
    "Geometry",
    "HeadImportance",
    "PatternAutoencoder",
    "PatternCollector",
    "PatternSet",
    "PatternSummary",
    "Section",
    "SinkAnalysis",
    "SinkReport",
    "analyze_text",
    "analyze_vision",
    "classify_tokens",
    "collect_patterns",
    "distance_profile",
    "distance_profiles",
    "distance_trend",
    "find_sinks",
    "head_importance",
    "importance_heatmap",
    "pattern_gallery",
    "pattern_histogram",
    "probability_blocks",
    "render_html",
    "screenshot",
    "sink_heatmap",
    "sinks",
    "summarize_patterns",
    "write_html",
]
