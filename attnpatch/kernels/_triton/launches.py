"""Every kernel specialisation the dispatcher can launch, found by running the launchers themselves.

`recording()` swaps the @triton.jit kernels of the launcher modules for recorders, so a launcher call records its
launch (kernel, grid, arguments, constexprs, warps, stages) instead of running it (or as well, with `run=True`).
`dispatcher_launches()` calls the launchers on meta tensors (no memory, no device) over every case the dispatcher
can produce: dtype x head dim x the row shapes that select the tile rule's configurations x the switches that change
code. The tiles, constexprs and argument types therefore come from the code a real launch runs, not from a table.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .. import backend
from ..masking import KeyRanges
from . import column_mass, flash, outlook, sink_correction, var

LAUNCHER_MODULES = (flash, column_mass, sink_correction, var, outlook)
OPTION_NAMES = ("num_warps", "num_stages")


@dataclass
class Launch:
    """One kernel launch as the launcher made it."""

    kernel: object  # the @triton.jit function (a JITFunction; an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple
    args: tuple
    kwargs: dict
    cases: list[str] = field(default_factory=list)  # the dispatcher cases that make this launch

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return f"{fn.__module__}.{fn.__qualname__}"

    @property
    def constexprs(self) -> dict:
        """The keyword constexprs (tiles and switches), without the launch options."""
        return {k: v for k, v in self.kwargs.items() if k not in OPTION_NAMES}

    @property
    def options(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k in OPTION_NAMES}


class _Recorder:
    def __init__(self, kernel, sink: list[Launch], run: bool) -> None:
        self.kernel, self.sink, self.run = kernel, sink, run
        self.fn = getattr(kernel, "fn", kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.kernel, tuple(grid), args, dict(kwargs)))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
            return None

        return launch

    def __call__(self, *args, **kwargs):  # a helper called from inside an interpreted kernel runs as it is
        return self.kernel(*args, **kwargs)


def jit_kernels(module) -> dict[str, object]:
    """The @triton.jit functions defined in `module` (kernels and their helpers), by attribute name."""
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, JITFunction | InterpretedFunction)
        and getattr(value, "fn", value).__module__ == module.__name__
    }


@contextmanager
def recording(run: bool = False) -> Iterator[list[Launch]]:
    """Within the block, every launch of a launcher module's kernels is appended to the yielded list (and also run
    when `run`). Not thread-safe: it swaps module attributes for the block's duration."""
    sink: list[Launch] = []
    saved = {module: jit_kernels(module) for module in LAUNCHER_MODULES}
    try:
        for module, kernels in saved.items():
            for name, kernel in kernels.items():
                setattr(module, name, _Recorder(kernel, sink, run))
        yield sink
    finally:
        for module, kernels in saved.items():
            for name, kernel in kernels.items():
                setattr(module, name, kernel)


@contextmanager
def compiled_rules() -> Iterator[None]:
    """Make the launchers choose as they do on a GPU (tile rule, upcasts), also inside an interpreter session."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


# ---------------------------------------------------------------------------------------------------------- the cases

DTYPES = backend.SUPPORTED_DTYPES
META = torch.device("meta")


@dataclass(frozen=True)
class Rows:
    """A call shape: batch, query heads, kv heads, query rows, keys."""

    name: str
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int


# Prefill takes the tile rule's large-block branch (rows > 16); a folded decode step (the kv group's query heads as
# rows), an unfolded one (no grouping, or fold_decode_groups=False) and a short chunk (assisted decoding) take its
# 16-row branch, with different argument specialisations (a row stride of 0; Lq = 1; unaligned lengths).
ROWS = (
    Rows("prefill", 1, 8, 2, 256, 256),
    Rows("decode", 1, 8, 2, 1, 256),
    Rows("decode_unfolded", 1, 8, 8, 1, 256),
    Rows("chunk", 1, 8, 2, 5, 261),
)
SPLITS = (1, 4)  # key splits: 1, or several (flash-decoding: partial results merged; also on few long query blocks)


def head_dims() -> tuple[int, ...]:
    """Head dims up to backend.MAX_HEAD_DIM: each power of two from 16 (the BLOCK_D values) and 80 (BLOCK_D 128 with
    EVEN_D False: masked head-dim loads)."""
    even = [1 << i for i in range(4, backend.MAX_HEAD_DIM.bit_length())]
    return tuple(sorted([*even, 80]))


def _tensors(r: Rows, dtype: torch.dtype, d: int):
    q = torch.empty(r.b, r.lq, r.hq, d, dtype=dtype, device=META).transpose(1, 2)  # transformers' [B, L, H, D] memory
    k = torch.empty(r.b, r.hkv, r.lk, d, dtype=dtype, device=META)
    v = torch.empty(r.b, r.hkv, r.lk, d, dtype=dtype, device=META)
    lo = torch.zeros(r.b, r.lq, dtype=torch.int32, device=META)
    return q, k, v, KeyRanges(lo=lo, hi=lo + r.lk)


def _attention_calls(
    dtype: torch.dtype, d: int, r: Rows, every_switch: bool
) -> Iterator[tuple[str, Callable[[], object]]]:
    """(case name, thunk) for the launcher calls of the attention-shaped ops on one shape: each caller's default
    switches (no softcap; one key range in prefill and several in decode, as `key_splits` picks on a GPU; ACT's
    decode logits; VAR's paper rule), or with `every_switch` every combination of the switches."""
    q, k, v, ranges = _tensors(r, dtype, d)
    f32 = dict(dtype=torch.float32, device=META)
    weight = torch.empty(r.b, r.lq, **f32)
    lse = torch.empty(r.b, r.hq, r.lq, **f32)
    plain = torch.empty(r.b, r.hq, r.lq, d, **f32)
    classes = torch.empty(r.b, r.lk, dtype=torch.int8, device=META)
    decode = r.lq == 1
    pick = (lambda *values: values) if every_switch else (lambda *values: values[:1])
    for softcap in pick(None, 30.0):
        kw = dict(scale=d**-0.5, softcap=softcap)
        tag = " softcap" if softcap else ""
        for splits in SPLITS if every_switch else SPLITS[1:] if decode else SPLITS[:1]:
            for lse_out in pick(False, True):  # attention(return_lse=...)
                yield (
                    f"attention lse={lse_out} splits={splits}{tag}",
                    partial(flash.flash_forward, q, k, v, ranges, return_lse=lse_out, num_splits=splits, **kw),
                )
            # ACT pass A: an fp32 output, with the logits of a decode step (decode_mass_from_logits) or without
            for logits in pick(True, False) if decode else (False,):
                buf = torch.empty(r.b, r.hq, r.lq, r.lk, **f32) if logits else None
                yield f"act.flash logits={logits} splits={splits}{tag}", partial(
                    flash.flash_forward, q, k, v, ranges, out=torch.empty_like(plain), logits_out=buf,
                    num_splits=splits, **kw,
                )  # fmt: skip
            for convention in pick("paper", "code"):
                yield f"var {convention} splits={splits}{tag}", partial(
                    var.var_forward, q, k, v, ranges, classes, weight.bool(), keep_fraction=0.6, rho=0.5, summ=0.2,
                    convention=convention, num_splits=splits, **kw,
                )  # fmt: skip
        # a decode step takes its column mass from the logits by default, but a short chunk (assisted decoding's
        # verification) runs the kernel with the same 16-row tiles
        yield f"column_mass{tag}", partial(column_mass.column_mass_forward, q, k, lse, ranges, weight, **kw)
        index = torch.empty(r.b, r.hq, 4, dtype=torch.int32, device=META)
        yield f"act.sink_correction{tag}", partial(
            sink_correction.sink_correction_forward, q, k, v, plain, lse, ranges, weight, index, beta=0.4, guard=0.03,
            **kw,
        )  # fmt: skip


# Outlook (K, stride, padding): VOLO's (3, 2, 1), stride 1, and the largest K the Triton path takes (K*K <= 64).
OUTLOOK_GEOMETRIES = ((3, 2, 1), (3, 1, 1), (8, 1, 3))
OUTLOOK_HEAD_DIMS = (16, 32, 64)  # channels per head: one per channel block of `outlook._blocks` (VOLO's is 32)


def outlook_geometries() -> tuple[tuple[int, int, int], ...]:
    """Every K the Triton path takes (K*K <= outlook.MAX_TRITON_KK) with strides 1 and 2 and timm's padding."""
    from ..outlook import MAX_TRITON_KK

    ks = [k for k in range(1, 9) if k * k <= MAX_TRITON_KK]
    return tuple((k, s, (k - 1) // 2) for k in ks for s in (1, 2))


def _outlook_calls(
    dtype: torch.dtype, head_dim: int, k: int, stride: int, pad: int
) -> Iterator[tuple[str, Callable[[], object]]]:
    heads, h = 2, 14
    grid = (h + 2 * pad - k) // stride + 1
    v = torch.empty(2, h, h, heads * head_dim, dtype=dtype, device=META)
    logits = torch.empty(2, grid, grid, heads * k**4, dtype=dtype, device=META)
    lse = torch.empty(2, grid, grid, heads, k * k, dtype=torch.float32, device=META)
    geo = dict(kernel_size=k, padding=pad, stride=stride, scale=head_dim**-0.5)
    for store in (False, True):  # inference, or training (the backward reads the LSE)
        yield f"outlook.forward lse={store}", partial(outlook.outlook_forward, logits, v, store_lse=store, **geo)
    yield "outlook.backward", partial(outlook.outlook_backward, logits, v, lse, v, **geo)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cases(full: bool) -> Iterator[tuple[str, Callable[[], object]]]:
    """(case name, thunk calling one launcher).

    CI subset: bf16 and fp32 x head dims 128 and 256 x prefill and decode, with each caller's default switches;
    outlook at VOLO's geometry and head dim 32 (bf16) and at the largest K and channel block (fp32).
    Full: every dtype x head dim (`head_dims`) x prefill and decode with the default switches; every combination of
    the switches (softcap, LSE and logits stores, key splits, VAR's rule) and the unfolded
    decode for bf16 at head dims 128 and 256 and for fp32 at 128; outlook at every dtype x channel block x
    `OUTLOOK_GEOMETRIES`, and every K and stride (`outlook_geometries`) at bf16 / head dim 32.
    """
    every_switch = {(torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128)} if full else set()
    dtypes = DTYPES if full else (torch.bfloat16, torch.float32)
    for dtype, d in itertools.product(dtypes, head_dims() if full else (128, 256)):
        every = (dtype, d) in every_switch
        for r in ROWS if every else ROWS[:2]:
            for name, thunk in _attention_calls(dtype, d, r, every):
                yield f"{name} | {_name(dtype)} d={d} {r.name}", thunk
    outlook_cases = (
        [(dtype, hd, geo) for dtype in DTYPES for hd in OUTLOOK_HEAD_DIMS for geo in OUTLOOK_GEOMETRIES]
        + [(torch.bfloat16, 32, geo) for geo in outlook_geometries()]
        if full
        else [(torch.bfloat16, 32, OUTLOOK_GEOMETRIES[0]), (torch.float32, 64, OUTLOOK_GEOMETRIES[-1])]
    )
    for dtype, hd, geo in dict.fromkeys(outlook_cases):
        for name, thunk in _outlook_calls(dtype, hd, *geo):
            yield f"{name} | {_name(dtype)} head_dim={hd} K={geo[0]} stride={geo[1]} pad={geo[2]}", thunk


def dispatcher_launches(full: bool = True) -> list[Launch]:
    """Every launch of `cases(full)`, recorded with the GPU's rules and the current kernel options; one entry per
    distinct (kernel, constexprs, launch options, argument types), with the cases that make it."""
    found: dict[tuple, Launch] = {}
    with compiled_rules(), recording() as sink:
        for name, thunk in cases(full):
            start = len(sink)
            thunk()
            for launch in sink[start:]:
                key = launch_key(launch)
                found.setdefault(key, launch).cases.append(name)
    return list(found.values())


def _arg_key(a) -> object:
    if isinstance(a, torch.Tensor):
        return str(a.dtype)
    if isinstance(a, bool) or not isinstance(a, int):
        return type(a).__name__
    return "1" if a == 1 else "16" if a % 16 == 0 else "int"  # Triton's integer specialisations


def launch_key(launch: Launch) -> tuple:
    """What makes a distinct compilation: kernel, constexprs, options and each argument's type/specialisation."""
    return (
        launch.name,
        tuple(sorted((k, str(v)) for k, v in launch.kwargs.items())),
        tuple(_arg_key(a) for a in launch.args),
    )
