"""One file per method: a validated config dataclass and the per-call attention rule."""

from . import act, head_mask, outlook, var  # noqa: F401  (register the methods)
from .base import METHODS, AttentionCall, Method

__all__ = ["METHODS", "AttentionCall", "Method"]
