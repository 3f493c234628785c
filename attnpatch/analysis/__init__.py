"""Attention analysis: sink statistics (more arrives with the analysis issue)."""

from .sinks import SinkReport, find_sinks

__all__ = ["SinkReport", "find_sinks"]
