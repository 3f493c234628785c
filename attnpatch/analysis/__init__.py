"""Attention analysis: where the sinks are (`sinks`, `SinkAnalysis`) and pictures of them (`sink_heatmap`)."""

from .plots import sink_heatmap
from .sink_stats import TOKEN_CLASSES, SinkAnalysis, SinkReport, classify_tokens, find_sinks, sinks

__all__ = ["TOKEN_CLASSES", "SinkAnalysis", "SinkReport", "classify_tokens", "find_sinks", "sink_heatmap", "sinks"]
