"""Data parallelism for evaluation and calibration: shard items over the processes of `accelerate launch`, gather
per-item results. Without a launcher (WORLD_SIZE unset or 1) everything runs in the one process."""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")


class Processes:
    """Rank, world size and an all-gather of Python objects (accelerate's when launched with it)."""

    def __init__(self) -> None:
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # without a GPU the processes join a gloo group (accelerate only does so when asked for cpu)
            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = state.process_index, state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> list[int]:
        """Indices of the items this process handles (round robin, so lengths balance)."""
        return list(range(self.rank, count, self.world))

    def gather(self, values: list[T]) -> list[T]:
        """Concatenation of every process's `values` (in rank order), on every process."""
        if self.world == 1:
            return values
        from accelerate.utils import gather_object

        return gather_object(values)
