"""Evaluation harness: multiple-choice tasks, batched log-likelihood scoring, paired statistics, Only Connect Wall."""

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
from .stats import accuracy, bootstrap_ci, mcnemar_exact, paired_comparison
from .tasks import Item, available_tasks, load_task, task_sizes

__all__ = [
    "Item",
    "OCWDataError",
    "OCWReport",
    "Wall",
    "accuracy",
    "available_tasks",
    "best_partition",
    "chance_reference",
    "bootstrap_ci",
    "choose",
    "connection_metrics",
    "evaluate_ocw",
    "grouping_metrics",
    "load_task",
    "load_walls",
    "mcnemar_exact",
    "option_logprobs",
    "paired_comparison",
    "parse_connections",
    "parse_groups",
    "score_items",
    "task_sizes",
]
