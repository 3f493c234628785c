"""Only Connect Wall (Naeini et al., NeurIPS 2023): `walls` (loading, prompts, parsing model output), `metrics` (the
authors' evaluator), `solver` (the constrained pair log-likelihood solver), `runner` (the A/B runner)."""

from .metrics import chance_reference, connection_metrics, grouping_metrics
from .runner import OCWReport, evaluate_ocw, rescore
from .solver import best_partition
from .walls import OCWDataError, Wall, load_walls, parse_connections, parse_groups, parse_walls

__all__ = [
    "OCWDataError",
    "OCWReport",
    "Wall",
    "best_partition",
    "chance_reference",
    "connection_metrics",
    "evaluate_ocw",
    "grouping_metrics",
    "load_walls",
    "parse_connections",
    "parse_groups",
    "parse_walls",
    "rescore",
]
