"""Scores of predicted trajectories and answers, and the constant-velocity baseline.

Per subject trajectory (predicted vs true boxes over the target frames): displacement = Euclidean distance between
box centres in normalised units; ADE = mean displacement over the frames where the truth is in view and a box was
predicted; FDE = displacement at the last frame where the truth is in view (missing when no box was predicted there);
IoU per frame, a missing prediction counting 0. Frames the truth marks out of view are not scored by ADE/FDE/IoU;
`exits` counts whether the prediction says `out` where the truth does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .scenes import Box, Scene, centre
from .trajectory import Track


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(a == b)


def displacement(a: Box, b: Box) -> float:
    (ax, ay), (bx, by) = centre(a), centre(b)
    return math.hypot(ax - bx, ay - by)


@dataclass
class TrajectoryScore:
    """One subject's scores; `ious[k]` is the IoU at the k-th scored frame (0 when no box was predicted)."""

    subject: int
    ade: float | None
    fde: float | None
    ious: list[float] = field(default_factory=list)
    expected: int = 0  # truth boxes in view
    predicted: int = 0  # of those, frames with a predicted box
    exit_true: bool = False  # the truth leaves the view within the frames
    exit_predicted: bool = False  # the prediction says 'out' at some frame


def score_trajectory(subject: int, predicted: Track | None, truth: Track) -> TrajectoryScore:
    """Scores of `predicted` (None or {} when the model wrote nothing parseable for this subject) against `truth`."""
    predicted = predicted or {}
    distances, ious, final = [], [], None
    visible = [f for f in sorted(truth) if truth[f] is not None]
    for f in visible:
        box = predicted.get(f)
        if box is None:
            ious.append(0.0)
            continue
        d = displacement(box, truth[f])
        distances.append(d)
        ious.append(iou(box, truth[f]))
        if f == visible[-1]:
            final = d
    return TrajectoryScore(
        subject,
        ade=sum(distances) / len(distances) if distances else None,
        fde=final,
        ious=ious,
        expected=len(visible),
        predicted=len(distances),
        exit_true=any(b is None for b in truth.values()),
        exit_predicted=any(b is None for b in predicted.values()),
    )


def score_tracks(predicted: Mapping[int, Track] | None, truth: Mapping[int, Track]) -> list[TrajectoryScore]:
    """One TrajectoryScore per subject of `truth` (subjects the model invented are ignored)."""
    predicted = predicted or {}
    return [score_trajectory(s, predicted.get(s), t) for s, t in truth.items()]


def constant_velocity(scene: Scene, subjects: Sequence[int] | None = None) -> dict[int, Track]:
    """Extrapolate each subject's last observed box with the velocity of its last two observed boxes (zero with one
    observed frame); the box keeps its observed size, is clipped to [0, 1], and is `out` once its centre leaves."""
    out: dict[int, Track] = {}
    last = scene.observed - 1
    for s in scene.subjects if subjects is None else subjects:
        scene.check_subject(s)
        now = scene.tracks[s][last]
        before = scene.tracks[s][last - 1] if last >= 1 else now
        (cx, cy), (px, py) = centre(now), centre(before)
        w, h = now[2] - now[0], now[3] - now[1]
        track: Track = {}
        for k, f in enumerate(scene.future(), start=1):
            x, y = cx + k * (cx - px), cy + k * (cy - py)
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                track[f] = None
                break
            track[f] = (max(0.0, x - w / 2), max(0.0, y - h / 2), min(1.0, x + w / 2), min(1.0, y + h / 2))
        out[s] = track
    return out


def summarise(scores: Sequence[TrajectoryScore]) -> dict[str, float | list[float] | int]:
    """ADE and FDE (means over trajectories that have them), mean IoU per scored frame index, coverage (predicted
    boxes / truth boxes in view), and the counts."""
    ade = [s.ade for s in scores if s.ade is not None]
    fde = [s.fde for s in scores if s.fde is not None]
    width = max((len(s.ious) for s in scores), default=0)
    per_frame = [float(np.mean([s.ious[k] for s in scores if len(s.ious) > k])) for k in range(width)]
    expected = sum(s.expected for s in scores)
    return {
        "ade": float(np.mean(ade)) if ade else float("nan"),
        "fde": float(np.mean(fde)) if fde else float("nan"),
        "mean_iou_per_frame": per_frame,
        "coverage": sum(s.predicted for s in scores) / expected if expected else float("nan"),
        "trajectories": len(scores),
        "with_ade": len(ade),
        "with_fde": len(fde),
    }


def answer_accuracy(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """Fraction of exact matches; a missing answer (None) is wrong."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need equal, non-empty lists, got {len(predicted)} and {len(truth)}")
    return sum(p is not None and p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


def parse_rate(ok: Sequence[bool]) -> float:
    """Fraction of outputs that parsed completely."""
    return sum(bool(x) for x in ok) / len(ok) if len(ok) else float("nan")


def mean_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of `values` (NaN, NaN when empty)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, arr.size, size=(n_boot, arr.size))
    lo, hi = np.quantile(arr[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
