"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
from tiny_models import SINK_TOKEN, SINK_TOKEN_2, left_padded_batch


@pytest.fixture
def sink_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different length, each with a first sink (position 0) and a hidden sink later on."""
    return left_padded_batch(
        [
            [SINK_TOKEN, 11, 12, 13, SINK_TOKEN_2, 14, 15, 16, 17, 18, 19],
            [SINK_TOKEN, 21, 22, SINK_TOKEN_2, 23, 24, 25, 26],
        ]
    )
