"""One file per method: a validated config dataclass and the per-call attention rule."""

from . import act  # noqa: F401  (registers the method)
from .base import METHODS, AttentionCall, Method

__all__ = ["METHODS", "AttentionCall", "Method"]
