"""The compute layer's switches, as one frozen `KernelOptions` per thread (per context): no module-level state.

    with kernel_options(fold_decode_groups=False):   # this thread / context only, restored on exit
        attention(q, k, v)

The Triton launchers read `current_kernel_options()` when they launch. The switches keep an earlier code path
runnable so that benchmarks can time it beside the current one; the defaults are the current paths. Imports only the
standard library (no triton), so `attnpatch.kernels` stays cheap to import.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

TILED_KERNELS = ("flash", "column_mass", "sink_correction", "var")  # the kernels whose tiles `KernelOptions` can fix


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch settings of a flash-style Triton kernel."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelOptions:
    """fold_decode_groups: a decode step (Lq = 1) with grouped heads runs each kv head's query heads as the rows of one
    program (flash and VAR kernels); False: one program per query head.
    decode_mass_from_logits: an ACT decode step takes the column mass from the logits the flash pass writes; False:
    a second pass over K (the column-mass kernel).
    split_keys: the VAR kernel splits the keys over programs by occupancy (mostly in decode) and merges the partial
    results; False: one program per query block and head. (The flash kernel always splits by occupancy.)
    tiles: fixed tiles per kernel (names in `TILED_KERNELS`; their block_d is ignored: it follows the head dim), e.g.
    while sweeping them (benchmarks/tune_tiles.py); kernels not named use the rule in `_triton/common.tiles`.
    """

    fold_decode_groups: bool = True
    decode_mass_from_logits: bool = True
    split_keys: bool = True
    tiles: Mapping[str, Tiles] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "tiles" and not isinstance(value, bool):
                raise TypeError(f"kernel option {f.name} must be a bool, got {value!r}")
        if not isinstance(self.tiles, Mapping):
            raise TypeError(f"kernel option tiles must be a mapping of kernel name to Tiles, got {self.tiles!r}")
        for name, value in self.tiles.items():
            if name not in TILED_KERNELS:
                raise ValueError(f"kernel option tiles: unknown kernel {name!r} (kernels: {', '.join(TILED_KERNELS)})")
            if not isinstance(value, Tiles):
                raise TypeError(f"kernel option tiles[{name!r}] must be a Tiles, got {value!r}")
        object.__setattr__(self, "tiles", MappingProxyType(dict(self.tiles)))  # a private, read-only copy


DEFAULTS = KernelOptions()  # frozen, so a safe ContextVar default
_current: ContextVar[KernelOptions] = ContextVar("attnpatch_kernel_options", default=DEFAULTS)


def current_kernel_options() -> KernelOptions:
    """The options in force in this thread / context (the defaults unless inside `kernel_options`)."""
    return _current.get()


@contextmanager
def kernel_options(**changes: object) -> Iterator[KernelOptions]:
    """Run the block with the current options changed by `changes` (names and types checked: TypeError or ValueError
    naming the option), for this thread / context only; the previous options return on exit, also when it raises."""
    names = [f.name for f in fields(KernelOptions)]
    unknown = [name for name in changes if name not in names]
    if unknown:
        raise TypeError(f"unknown kernel option(s) {', '.join(unknown)} (options: {', '.join(names)})")
    options = replace(_current.get(), **changes)
    token = _current.set(options)
    try:
        yield options
    finally:
        _current.reset(token)
