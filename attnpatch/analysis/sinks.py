"""Where a model's attention sinks are: ACT's column statistic for every (layer, head), without changing outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..api import patched


@dataclass(frozen=True)
class SinkReport:
    """One detected sink: a key whose mean attention over the rows that see it exceeds the threshold."""

    layer: int
    head: int
    batch: int
    position: int
    column_mean: float
    rows: int  # query rows that saw the key
    first: bool  # the first sink of its sequence (ACT keeps it)


@torch.inference_mode()
def find_sinks(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, threshold: float = 0.1
) -> list[SinkReport]:
    """Run `model` once with neutral ACT (beta=1, every head) and list every key above `threshold`, first sinks
    included, sorted by (batch, layer, head, position)."""
    reports = []
    with patched(model, "act", beta=1.0, threshold=threshold, heads="all", keep_first_sink=False) as patch:
        model(input_ids=input_ids, attention_mask=attention_mask)
        for layer, stats in sorted(patch.method.column_stats().items()):
            mean, count = stats.mean, stats.count.expand_as(stats.mean)
            hits = (mean > threshold).nonzero().tolist()
            first_seen: set[tuple[int, int]] = set()
            for b, h, pos in hits:
                reports.append(
                    SinkReport(
                        layer, h, b, pos, float(mean[b, h, pos]), int(count[b, h, pos]), (b, h) not in first_seen
                    )
                )
                first_seen.add((b, h))
    return sorted(reports, key=lambda r: (r.batch, r.layer, r.head, r.position))
