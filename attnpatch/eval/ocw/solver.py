"""Constrained OCW solver for small models: score clue pairs by log-likelihood, then search the best partition.

Free generation asks a 270M-0.5B model to write 16 clues in 4 lines, which it mostly cannot do (it repeats, invents or
drops clues). The constrained solver only asks the model which clues go together and guarantees a valid 4x4 answer:

1. Pair scores: for every ordered pair (a, b) of the wall's clues, S[a, b] = log P(" b" | "a,") under the model -- the
   probability that b continues a list that starts with a. One item per anchor a with its 15 other clues as options,
   scored with the batched scorer of `scoring.py` (left padding, single-token options share one row); 240 continuations
   of rows about 5 tokens long, so a wall costs several hundred token-forwards (2-7 s for Gemma-3 270M on one CPU
   thread), where scoring the 1820 four-clue groups (~20k tokens per wall) or showing all 16 clues in every context
   (~10k) would cost 20-40 times more. The price: each pair is judged without the rest of the wall (no red herrings in
   view), and the prompt is zero-shot unless `shots` adds example groups in front of every context.
2. Search: the partition into 4 groups of 4 that maximises the sum of S over ordered pairs within groups, found
   exactly by scoring all 2,627,625 partitions (one vectorised gather per wall, a few tens of ms). Summing both
   directions makes the optimum immune to per-clue biases: a clue's frequency (log P(b) in every context) and how
   predictive it is as an anchor (a term g(a) in every row) add the same constant to every partition, since each clue
   has exactly 3 partners in both directions -- so raw log-probabilities rank partitions exactly as PMI would.

Task 2 (naming connections) is not part of this mode: the authors' task 2 gives the ground-truth groups, so it does not
depend on how the grouping was found, and it runs by generation (`mode="generate"`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

from ..scoring import option_logprobs
from ..tasks import Item
from .walls import Wall, format_examples

CONTEXT = "{a},"
OPTION = " {b}"


def pair_items(clues: Sequence[str], prefix: str = "", wall_id: str = "") -> list[Item]:
    """One item per anchor clue a: context `prefix + "a,"`, options " b" for the 15 other clues (in clue order)."""
    items = []
    for i, a in enumerate(clues):
        options = [OPTION.format(b=b) for j, b in enumerate(clues) if j != i]
        items.append(Item(prefix + CONTEXT.format(a=a), options, 0, f"ocw/{wall_id}/{i}"))
    return items


def pair_matrix(logprobs: Sequence[Sequence[float]]) -> np.ndarray:
    """16x16 matrix S[a, b] from the 16 anchors' option log-probs (diagonal 0)."""
    n = len(logprobs)
    matrix = np.zeros((n, n))
    for i, row in enumerate(logprobs):
        matrix[i, [j for j in range(n) if j != i]] = row
    return matrix


def example_prefix(examples: Sequence[Wall]) -> str:
    """k-shot prefix for the pair contexts: the example walls' groups, one "w1, w2, w3, w4" line each."""
    if not examples:
        return ""
    lines = [
        line.split(". Connection:")[0] for line in format_examples(examples).splitlines() if ". Connection:" in line
    ]
    return "\n".join(lines) + "\n"


def pair_scores(
    model,
    tokenizer,
    clue_lists: Sequence[Sequence[str]],
    *,
    prefix: str = "",
    batch_size: int = 64,
    progress: bool = False,
) -> list[np.ndarray]:
    """S[a, b] = log P(" b" | prefix + "a,") for every wall (a list of 16 clues each), scored in shared batches."""
    items = [item for k, clues in enumerate(clue_lists) for item in pair_items(clues, prefix, str(k))]
    logprobs = option_logprobs(model, tokenizer, items, batch_size=batch_size, progress=progress)
    return [pair_matrix(logprobs[16 * k : 16 * (k + 1)]) for k in range(len(clue_lists))]


def _local_partitions(n: int) -> np.ndarray:
    """All partitions of range(n) (n a multiple of 4) into groups of 4, as (count, n // 4, 4) int8 indices; groups
    are ordered by their smallest element and sorted inside."""
    if n == 4:
        return np.arange(4, dtype=np.int8)[None, None, :]
    rest = _local_partitions(n - 4)
    blocks = []
    for trio in itertools.combinations(range(1, n), 3):
        first = np.broadcast_to(np.array((0, *trio), dtype=np.int8), (len(rest), 1, 4))
        others = np.array([i for i in range(1, n) if i not in trio], dtype=np.int8)
        blocks.append(np.concatenate([first, others[rest]], axis=1))
    return np.concatenate(blocks)


@functools.lru_cache(maxsize=1)
def partition_table() -> tuple[np.ndarray, np.ndarray]:
    """(groups, partitions): the 1820 four-clue groups of 16 clues (1820, 4), and all 2,627,625 partitions of the
    16 clues as (2627625, 4) int16 indices into `groups` (built once, about 20 MB)."""
    groups = np.array(list(itertools.combinations(range(16), 4)), dtype=np.int64)
    index = np.full(1 << 16, -1, dtype=np.int16)
    index[(1 << groups).sum(axis=1)] = np.arange(len(groups), dtype=np.int16)
    rest = _local_partitions(12)
    parts = []
    for trio in itertools.combinations(range(1, 16), 3):
        others = np.array([i for i in range(1, 16) if i not in trio], dtype=np.int64)
        masks = (1 << others[rest]).sum(axis=-1)  # (5775, 3)
        first = np.full((len(rest), 1), index[(1 << np.array((0, *trio))).sum()], dtype=np.int16)
        parts.append(np.concatenate([first, index[masks]], axis=1))
    return groups, np.concatenate(parts)


def group_scores(scores: np.ndarray) -> np.ndarray:
    """Score of each of the 1820 groups: the sum of `scores` over its 12 ordered pairs."""
    if scores.shape != (16, 16):
        raise ValueError(f"expected a 16x16 pair-score matrix, got {scores.shape}")
    sym = scores + scores.T
    groups, _ = partition_table()
    return sum(sym[groups[:, i], groups[:, j]] for i, j in itertools.combinations(range(4), 2))


def best_partition(scores: np.ndarray) -> list[list[int]]:
    """The partition of the 16 clues into 4 groups of 4 maximising the within-group pair scores (exact search).

    `scores` is 16x16 (S[a, b], any real values; only S + S.T matters). Groups are ordered by their first clue, and
    ties go to the partition listed first.
    """
    per_group = group_scores(np.asarray(scores, dtype=np.float64))
    if not np.isfinite(per_group).all():
        raise ValueError("pair scores must be finite")
    groups, partitions = partition_table()
    totals = per_group[partitions].sum(axis=1)
    return [groups[g].tolist() for g in partitions[int(np.argmax(totals))]]


def solve(clues: Sequence[str], scores: np.ndarray) -> list[list[str]]:
    """The best partition of `clues` (in their order) as 4 groups of clue strings."""
    return [[clues[i] for i in group] for group in best_partition(scores)]
