"""Offline steps that produce profiles: `calibrate(model, tokenizer, tasks, method="act")` selects ACT heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..profiles import Profile

CALIBRATORS = ("act",)


def calibrate(model, tokenizer, tasks: Sequence[Any], method: str = "act", **options: Any) -> Profile:
    """Calibrate `method` on `model` with the calibration part of `tasks`; returns a Profile (see `Profile.save`).

    method "act": options of `attnpatch.calibrate.act.calibrate_act` (beta, threshold, min_visible_rows,
    candidates, shots, limit, min_z, max_heads, batch_size, checkpoint, progress).
    """
    if method == "act":
        from .act import calibrate_act

        return calibrate_act(model, tokenizer, tasks, **options)
    raise ValueError(f"no calibration for method {method!r}; calibratable methods: {list(CALIBRATORS)}")
