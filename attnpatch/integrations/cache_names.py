"""The name transformers gives the KV cache: `cache` from 5.25 on (the forward's argument and the output's field),
`past_key_values` before (5.25 still accepts it, with a deprecation warning, until its removal)."""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

CACHE_ARGUMENT = "cache" if Version(transformers.__version__).release >= (5, 25) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a model's output carries (None without `use_cache`), read without the deprecation warning."""
    return output.cache if hasattr(output, "cache") else getattr(output, "past_key_values", None)
