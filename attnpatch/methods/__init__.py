"""One file per method: a validated config dataclass and the per-call attention rule, registered by name."""

from . import act, adapter, head_mask, outlook, var  # noqa: F401  (each registers its method)
from .base import METHODS, AttentionCall, ForwardContext, Method, ModuleMethod, UnsupportedModelError, register_method

__all__ = [
    "METHODS",
    "AttentionCall",
    "ForwardContext",
    "Method",
    "ModuleMethod",
    "UnsupportedModelError",
    "register_method",
]
