"""Evaluation harness: multiple-choice tasks, batched log-likelihood scoring, paired statistics, Only Connect Wall."""

from .metrics import METRICS, continuation_length, pick
from .ocw import (
    OCWDataError,
    OCWReport,
    Wall,
    best_partition,
    chance_reference,
    connection_metrics,
    evaluate_ocw,
    grouping_metrics,
    load_walls,
    parse_connections,
    parse_groups,
)
from .scoring import choose, option_logprobs, score_items
from .stats import accuracy, benjamini_hochberg, bootstrap_ci, holm, mcnemar_exact, paired_comparison
from .tasks import Item, available_tasks, load_task, task_sizes

__all__ = [
    "METRICS",
    "Item",
    "OCWDataError",
    "OCWReport",
    "Wall",
    "accuracy",
    "available_tasks",
    "benjamini_hochberg",
    "best_partition",
    "chance_reference",
    "bootstrap_ci",
    "choose",
    "connection_metrics",
    "continuation_length",
    "evaluate_ocw",
    "grouping_metrics",
    "holm",
    "load_task",
    "load_walls",
    "mcnemar_exact",
    "option_logprobs",
    "paired_comparison",
    "parse_connections",
    "parse_groups",
    "pick",
    "score_items",
    "task_sizes",
]
