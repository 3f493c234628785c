"""VAR calibration: the hidden dimensions whose massive activations mark sink tokens (`calibrate_var`).

`capture` records the residual stream entering each decoder layer (as VAR's ratio |x[d]| / RMS(x)), `dimensions`
discovers the sink dimensions from it, `report` holds the result (`SinkDimReport`), its summary and warnings.
"""

from .capture import DEFAULT_TEXTS, capture_layer_inputs, layer_input_ratios
from .capture import _prompts as _prompts  # used by benchmarks/var_sink_dims.py
from .dimensions import calibrate_var, discover_sink_dims
from .report import DimStats, SinkDimReport
from .report import _tau_warnings as _tau_warnings  # used by tests/calibrate/test_var_calibrate.py

__all__ = [
    "DEFAULT_TEXTS",
    "DimStats",
    "SinkDimReport",
    "calibrate_var",
    "capture_layer_inputs",
    "discover_sink_dims",
    "layer_input_ratios",
]
