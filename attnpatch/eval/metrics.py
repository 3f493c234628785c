"""Multiple-choice metrics as lm-evaluation-harness defines them (`lm_eval/api/task.py`, `process_results`).

For an item with options o_1..o_k (continuations of the context, each starting with the target delimiter " "),
ll_i is the summed log-likelihood of o_i's tokens given the context:

- `acc`: the pick is argmax_i ll_i.
- `acc_norm`: the pick is argmax_i ll_i / len(c_i), where c_i is the choice string *without* the delimiter, i.e.
  o_i minus its one leading space (lm-eval: `len(choice)` of `doc_to_choice(doc)`, while it scores
  `target_delimiter + choice`). A choice that carries a space of its own keeps it (lm-eval's COPA).

Ties go to the first option in both (as `np.argmax`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Metric = Literal["acc", "acc_norm"]
METRICS: tuple[Metric, ...] = ("acc", "acc_norm")
DESCRIPTIONS = {
    "acc": "argmax of the summed log-likelihood of each option",
    "acc_norm": "argmax of the log-likelihood divided by the option's length in characters without its leading space",
}
DELIMITER = " "


def continuation_length(option: str) -> int:
    """The acc_norm denominator: characters of `option` without the one leading delimiter space (at least 1)."""
    return max(len(option[len(DELIMITER) :] if option.startswith(DELIMITER) else option), 1)


def check_metrics(metrics: Sequence[str]) -> tuple[Metric, ...]:
    """`metrics` as a tuple, refusing unknown names or an empty list."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or list(metrics)}; metrics: {', '.join(METRICS)}")
    return tuple(metrics)  # type: ignore[return-value]


def pick(logprobs: Sequence[float], options: Sequence[str], metric: Metric) -> int:
    """The option `metric` chooses (first on ties)."""
    if metric == "acc":
        scores = list(logprobs)
    elif metric == "acc_norm":
        scores = [lp / continuation_length(o) for lp, o in zip(logprobs, options, strict=True)]
    else:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    return max(range(len(scores)), key=scores.__getitem__)
