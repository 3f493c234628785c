"""Evaluation harness: multiple-choice tasks, batched log-likelihood scoring, paired statistics."""

from .scoring import choose, option_logprobs, score_items
from .stats import accuracy, bootstrap_ci, mcnemar_exact, paired_comparison
from .tasks import Item, available_tasks, load_task, task_sizes

__all__ = [
    "Item",
    "accuracy",
    "available_tasks",
    "bootstrap_ci",
    "choose",
    "load_task",
    "mcnemar_exact",
    "option_logprobs",
    "paired_comparison",
    "score_items",
    "task_sizes",
]
