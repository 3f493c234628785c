"""OCW metrics as the authors' evaluator computes them (`src/ocw/evaluate_only_connect.py`, class `Evaluate`).

Task 1 (grouping), per wall: words are lower-cased and stripped and sorted within each group; `correct_groups` counts
the ground-truth groups found exactly among the predicted groups, `full_wall` (solved) is correct_groups == 4. The 16
predicted words are labelled by their ground-truth group (`clue2group`; unknown words get fresh labels 4, 5, ...) and
compared with the predicted grouping [0,0,0,0,1,...,3] by sklearn's AMI, ARI and FMS. WD: both label lists are cut into
4 slices, slices found in both are dropped, and the remaining i-th slices are compared with scipy's
wasserstein_distance, each clipped at 1, summed and divided by 4. Global: mean WD/AMI/ARI/FMS, totals of full_wall and
correct_groups.

Task 2 (connections), per wall: lower-case and strip; exact match and ROUGE-1 F1 (HF `evaluate` "rouge", i.e.
rouge_score with its default tokenizer, no stemmer), each averaged over the 4 groups, then over walls. BERTScore F1 is
computed only when `bert_score` and its model are available offline, else reported as None.

Defects of the authors' code fixed here (they crash rather than give another number): groups are compared as tuples
(`set()` of lists raises TypeError), the label slices are materialised (`more_itertools.chunked` returns an iterator
that has no `.copy()`), a prediction that repeats a ground-truth group no longer fails in `remove_same` (it now checks
the slices still left), and predictions that are not 4x4 (or None) are padded/truncated with "" instead of failing.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

TASK1_KEYS = ("WD", "AMI", "ARI", "FMS")
PARTITIONS = 2_627_625  # 16! / (4!^4 4!): ways to split 16 clues into 4 unordered groups of 4
GROUP_CHANCE = 5_775 / PARTITIONS  # a given group of 4 is one of a random partition's groups: 1/455


def _norm(word: str) -> str:
    return word.lower().strip()


def as_4x4(groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """Truncate/pad to 4 groups of 4 words with "" (None: nothing predicted)."""
    rows = [[str(w) for w in list(g)[:4]] for g in list(groups or [])[:4]]
    rows = [g + [""] * (4 - len(g)) for g in rows]
    return rows + [[""] * 4 for _ in range(4 - len(rows))]


def clue2group(words: Sequence[str], reference: Sequence[str]) -> list[int]:
    """Label of each word: position // 4 of the word in `reference`; words not in it get 4, 5, ... in order.

    The authors' `utils.clue2group` (which replaces list entries while iterating) computes exactly this.
    """
    labels = {w: i // 4 for i, w in enumerate(reference)}
    fresh = itertools.count(4)
    return [labels[w] if w in labels else next(fresh) for w in words]


def _remove_same(pred: list[list[int]], gt: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Drop slices present in both lists (each match once)."""
    pred_left, gt_left = list(pred), list(gt)
    for piece in pred:
        if piece in gt_left:
            pred_left.remove(piece)
            gt_left.remove(piece)
    return pred_left, gt_left


def _wasserstein(pred_labels: list[int], gt_labels: list[int]) -> float:
    from scipy.stats import wasserstein_distance

    pred_sliced = [pred_labels[i : i + 4] for i in range(0, 16, 4)]
    gt_sliced = [gt_labels[i : i + 4] for i in range(0, 16, 4)]
    pred_sliced, gt_sliced = _remove_same(pred_sliced, gt_sliced)
    return sum(min(float(wasserstein_distance(p, g)), 1.0) for p, g in zip(pred_sliced, gt_sliced, strict=True)) / 4


def _sklearn():
    try:
        from sklearn import metrics
    except ImportError as e:
        raise ImportError("OCW metrics need scikit-learn: pip install 'attnpatch[eval]'") from e
    return metrics


def grouping_metrics(predicted: Sequence[Sequence[str]] | None, gt: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Task 1 metrics of one wall: correct_groups, full_wall, WD, AMI, ARI, FMS."""
    gt_sorted = [sorted(_norm(w) for w in g) for g in gt]
    pred_sorted = [sorted(_norm(w) for w in g) for g in as_4x4(predicted)]
    correct = len(set(map(tuple, gt_sorted)) & set(map(tuple, pred_sorted)))
    gt_list = [w for g in gt_sorted for w in g]
    pred_list = [w for g in pred_sorted for w in g]
    index_gt = clue2group(gt_list, gt_list)
    index_pred = clue2group(pred_list, gt_list)
    m = _sklearn()
    return {
        "correct_groups": correct,
        "full_wall": correct == 4,
        "WD": _wasserstein(index_pred, index_gt),
        "AMI": float(m.adjusted_mutual_info_score(index_gt, index_pred)),
        "ARI": float(m.adjusted_rand_score(index_gt, index_pred)),
        "FMS": float(m.fowlkes_mallows_score(index_gt, index_pred)),
    }


def summarize_grouping(per_wall: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The evaluator's global task 1 numbers: means of WD/AMI/ARI/FMS, totals of full_wall and correct_groups."""
    out: dict[str, Any] = {k: float(np.mean([w[k] for w in per_wall])) for k in TASK1_KEYS}
    out["full_wall"] = int(sum(w["full_wall"] for w in per_wall))
    out["correct_groups"] = int(sum(w["correct_groups"] for w in per_wall))
    out["walls"] = len(per_wall)
    return out


# ---------------------------------------------------------------------------------------------------- task 2

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lower-case, every run of non [a-z0-9] characters is a separator."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def rouge1_f1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1 of one prediction against one reference (rouge_score's unigram overlap, no stemming)."""
    pred, ref = Counter(rouge_tokens(prediction)), Counter(rouge_tokens(reference))
    overlap = sum(min(n, pred[t]) for t, n in ref.items())
    precision = overlap / max(sum(pred.values()), 1)
    recall = overlap / max(sum(ref.values()), 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def bert_score_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float] | None:
    """BERTScore F1 (lang "en", rescaled with baseline) when `bert_score` and its model load offline, else None."""
    try:
        import bert_score

        _, _, f1 = bert_score.score(list(predictions), list(references), lang="en", rescale_with_baseline=True)
    except Exception:  # not installed, or the model/baseline files are not available offline
        return None
    return [float(x) for x in f1]


def connection_metrics(predicted: Sequence[str] | None, gt: Sequence[str], bert: bool = False) -> dict[str, Any]:
    """Task 2 metrics of one wall: per-group exact match and ROUGE-1 F1 (and BERTScore F1), with their means."""
    pred = [_norm(str(p)) for p in list(predicted or [])[:4]]
    pred += [""] * (4 - len(pred))
    ref = [_norm(g) for g in gt]
    exact = [float(p == r) for p, r in zip(pred, ref, strict=True)]
    rouge = [rouge1_f1(p, r) for p, r in zip(pred, ref, strict=True)]
    out: dict[str, Any] = {
        "exact_match": float(np.mean(exact)),
        "rouge1_f1": float(np.mean(rouge)),
        "exact_match_groups": exact,
        "rouge1_f1_groups": rouge,
    }
    scores = bert_score_f1(pred, ref) if bert else None
    out["bert_score_f1"] = None if scores is None else float(np.mean(scores))
    return out


def summarize_connections(per_wall: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over walls of the per-wall means (BERTScore None when it was not computed)."""
    out: dict[str, Any] = {k: float(np.mean([w[k] for w in per_wall])) for k in ("exact_match", "rouge1_f1")}
    berts = [w["bert_score_f1"] for w in per_wall]
    out["bert_score_f1"] = None if any(b is None for b in berts) else float(np.mean(berts))
    out["walls"] = len(per_wall)
    return out


# ---------------------------------------------------------------------------------------------------- references


# chance_reference(20_000, seed=0), stored: the simulation takes about a minute (sklearn's AMI is slow)
CHANCE = {
    "WD": 0.918434375,
    "AMI": 0.0008249065567163147,
    "ARI": 0.0006119791666666653,
    "FMS": 0.20048958333333336,
    "correct_groups_per_wall": 4 * GROUP_CHANCE,
    "full_wall_rate": 1 / PARTITIONS,
    "simulated_correct_groups_per_wall": 0.00815,
    "n": 20_000,
}


def chance_reference(n: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Task 1 numbers of a uniformly random partition (a random permutation cut into 4 groups).

    WD/AMI/ARI/FMS are simulated means over `n` partitions (they do not depend on the words; n=None: the stored
    20,000-partition simulation, `CHANCE`); correct groups per wall (4/455) and the solved rate (1/2,627,625) are exact.
    """
    if n is None:
        return dict(CHANCE)
    rng = np.random.default_rng(seed)
    gt = [[f"w{g}{i}" for i in range(4)] for g in range(4)]
    flat = np.array([w for g in gt for w in g])
    sims = [grouping_metrics(rng.permutation(flat).reshape(4, 4).tolist(), gt) for _ in range(n)]
    out: dict[str, Any] = {k: float(np.mean([s[k] for s in sims])) for k in TASK1_KEYS}
    out["correct_groups_per_wall"] = 4 * GROUP_CHANCE
    out["full_wall_rate"] = 1 / PARTITIONS
    out["simulated_correct_groups_per_wall"] = float(np.mean([s["correct_groups"] for s in sims]))
    out["n"] = n
    return out


def paired_means(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):
    """Paired comparison of a per-wall metric: mean_a, mean_b, diff (b - a), diff_ci (percentile bootstrap over
    walls) and p (two-sided sign-flip permutation test of the mean difference; exact up to 16 walls)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"need two equal-length, non-empty 1-D arrays, got {x.shape} and {y.shape}")
    d = y - x
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {
        "n": int(d.size),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "diff": float(d.mean()),
        "diff_ci": (float(lo), float(hi)),
        "p": _sign_flip_p(d, rng),
    }


def _sign_flip_p(d: np.ndarray, rng: np.random.Generator, draws: int = 20_000) -> float:
    observed = abs(d.mean())
    if not d.any():
        return 1.0
    if d.size <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        signs = rng.choice((1.0, -1.0), size=(draws, d.size))
    stats = np.abs((signs * d).mean(axis=1))
    return float(((stats >= observed - 1e-12).sum() + (d.size > 16)) / (len(signs) + (d.size > 16)))
