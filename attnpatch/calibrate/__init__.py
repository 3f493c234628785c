"""Offline steps that produce profiles: `calibrate(model, tokenizer, tasks, method="act")` selects ACT heads,
`calibrate(model, tokenizer, texts, method="var")` discovers VAR's sink dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..profiles import Profile

CALIBRATORS = ("act", "var")


def calibrate(model, tokenizer, tasks: Sequence[Any] | None = None, method: str = "act", **options: Any) -> Profile:
    """Calibrate `method` on `model`; returns a Profile (see `Profile.save`).

    method "act": `tasks` are task names or loaded tasks, calibrated on their calibration part; options of
    `attnpatch.calibrate.act.calibrate_act` (beta, threshold, min_visible_rows, candidates, shots, limit, min_z,
    max_heads, batch_size, checkpoint, progress).

    method "var": `tasks` are the prompts (strings, or token-id lists with tokenizer None; None for a built-in set of
    English texts) on which the sink dimensions are measured; options of `attnpatch.calibrate.var.calibrate_var`
    (tau, min_layer, max_dims, consistency, sink_layer_fraction, dense_fraction, min_separation). The profile's
    options are {"sink_dims": [...], "tau": tau}; raises ValueError when no dimension marks sink tokens.
    """
    if method == "act":
        from .act import calibrate_act

        if tasks is None:
            raise ValueError("ACT calibration needs tasks: calibrate(model, tokenizer, ['sst2', ...], method='act')")
        return calibrate_act(model, tokenizer, tasks, **options)
    if method == "var":
        from .var import calibrate_var

        return calibrate_var(model, tokenizer, tasks, **options)
    raise ValueError(f"no calibration for method {method!r}; calibratable methods: {list(CALIBRATORS)}")
