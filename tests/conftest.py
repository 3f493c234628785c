"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter; this must be set before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tiny_models import SINK_TOKEN, SINK_TOKEN_2, left_padded_batch


@pytest.fixture
def sink_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different length, each with a first sink (position 0) and hidden sinks every 4 tokens, so that
    a 10-key sliding window always holds a sink (rows that see none spread their attention and move the statistic)."""
    return left_padded_batch(
        [
            [SINK_TOKEN, 11, 12, 13, SINK_TOKEN_2, 14, 15, 16, SINK_TOKEN_2, 18, 19],
            [SINK_TOKEN, 21, 22, SINK_TOKEN_2, 23, 24, 25, SINK_TOKEN_2],
        ]
    )
