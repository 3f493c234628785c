"""Accuracy, bootstrap confidence intervals, paired A/B comparison (exact McNemar test) and multiple-testing
corrections (Holm, Benjamini-Hochberg)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of `preds` equal to `labels`."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.size == 0:
        raise ValueError(f"need equal, non-empty shapes, got {preds.shape} and {labels.shape}")
    return float((preds == labels).mean())


def _as_binary(correct) -> np.ndarray:
    arr = np.asarray(correct, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("expected a non-empty 1-D array of 0/1 (or bool)")
    return arr


def _percentile_ci(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(correct, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of a 0/1 array."""
    arr = _as_binary(correct)
    idx = np.random.default_rng(seed).integers(0, arr.size, size=(n_boot, arr.size))
    return _percentile_ci(arr[idx].mean(axis=1), alpha)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs against p = 1/2."""
    if a_only + b_only == 0:
        return 1.0
    try:
        from scipy.stats import binomtest
    except ImportError as e:
        raise ImportError("McNemar's test needs scipy: pip install 'attnpatch[eval]'") from e
    return float(binomtest(b_only, a_only + b_only, 0.5).pvalue)


def paired_comparison(correct_a, correct_b, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Compare systems A and B scored on the same items (0/1 correctness arrays, same order).

    Returns n, acc_a, acc_b, diff (= acc_b - acc_a), diff_ci (paired percentile bootstrap over items), a_only and
    b_only (items only A, resp. only B, got right) and p_mcnemar (exact two-sided McNemar p-value).
    """
    a, b = _as_binary(correct_a), _as_binary(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return {
        "n": int(a.size),
        "acc_a": float(a.mean()),
        "acc_b": float(b.mean()),
        "diff": float(b.mean() - a.mean()),
        "diff_ci": _percentile_ci((b[idx] - a[idx]).mean(axis=1), alpha),
        "a_only": a_only,
        "b_only": b_only,
        "p_mcnemar": mcnemar_exact(a_only, b_only),
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate((p.size - np.arange(p.size)) * p[order]).clip(max=1.0)
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()
