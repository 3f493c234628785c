"""Sweep the tile sizes of the prefill kernels on one GPU: the flash pass, the column-mass pass and the sink
correction, each alone, on the shapes of `bench_attention.py` (causal prefill, 32 query / 8 kv heads, bf16).

    python benchmarks/tune_tiles.py [--length 8192] [--head-dims 128 64] [--repeats 20] [--out-dir ...] [--smoke]

For every (kernel, head dim) each configuration (BLOCK_M, BLOCK_N, warps, stages) is compiled, checked against the
default tiles' result (max abs difference within bf16 rounding: a wrong configuration is reported, never picked),
and timed (median of `repeats` runs with CUDA events after warm-up, L2 flushed). Configurations the compiler
refuses (shared memory) are recorded as such. The JSON lists every row and, per (kernel, head dim), the fastest
correct configuration and its time against the default tiles'. This measures; choosing new defaults for
`_triton/common.tiles` is a separate, reviewed change (benchmarks/NOTES.md).

`--smoke` runs two configurations on a tiny fp32 shape, on CPU too (Triton's interpreter): a check of this script.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ACT,
    Shape,
    Timer,
    add_run_options,
    cleanup,
    describe_path,
    error_text,
    make_inputs,
    report_stem,
    run_config,
    run_setup,
    write_report,
)

KERNELS = ("flash", "column_mass", "sink_correction")
GRID = dict(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))


def kernel_calls(shape: Shape, device: torch.device) -> dict:
    """kernel name -> a function running that kernel alone on fixed inputs (the other passes' outputs precomputed
    with the default tiles) and returning its output tensor."""
    from attnpatch.kernels._triton.column_mass import column_mass_forward
    from attnpatch.kernels._triton.flash import flash_forward
    from attnpatch.kernels._triton.sink_correction import sink_correction_forward
    from attnpatch.kernels.act import CLOSED_FORM_GUARD, select_sinks, sink_index
    from attnpatch.kernels.column_mass import ColumnStats
    from attnpatch.kernels.masking import query_rows, ranges_visible_count, structural_ranges

    q, k, v = make_inputs(shape, device)
    scale = shape.d**-0.5
    ranges = structural_ranges(shape.b, shape.lq, shape.lk, causal=True, sliding_window=None, device=device)
    valid = query_rows(None, ranges, shape.b, shape.lq, device)
    plain = torch.empty(q.shape, dtype=torch.float32, device=device)
    plain, lse = flash_forward(q, k, v, ranges, scale=scale, out=plain)
    colsum = column_mass_forward(q, k, lse, ranges, valid, scale=scale)
    stats = ColumnStats(colsum=colsum, count=ranges_visible_count(ranges, valid, shape.lk))
    sinks = select_sinks(stats, threshold=ACT["threshold"], min_visible_rows=1, keep_first_sink=True)
    index = sink_index(sinks)
    if index is None:
        raise RuntimeError("the planted sinks were not found: the sink-correction kernel would not run")

    def flash():
        return flash_forward(q, k, v, ranges, scale=scale, out=torch.empty_like(plain))[0]

    def column_mass():
        return column_mass_forward(q, k, lse, ranges, valid, scale=scale)

    def sink_correction():
        return sink_correction_forward(
            q, k, v, plain, lse, ranges, valid, index, scale=scale, beta=ACT["beta"], guard=CLOSED_FORM_GUARD
        )[0]

    return dict(flash=flash, column_mass=column_mass, sink_correction=sink_correction)


def sweep(shape: Shape, device: torch.device, timer: Timer, configs: list[dict]) -> list[dict]:
    from attnpatch.kernels import Tiles, kernel_options

    calls = kernel_calls(shape, device)
    rows = []
    for name in KERNELS:
        default = calls[name]()
        default_ms = statistics.median(timer.times_ms(calls[name]))
        rows.append(dict(kernel=name, d=shape.d, config="default", status="ok", median_ms=default_ms))
        for cfg in configs:
            row = dict(kernel=name, d=shape.d, config=cfg, status="ok")
            try:
                with kernel_options(tiles={name: Tiles(block_d=0, **cfg)}):  # block_d follows the head dim
                    out = calls[name]()
                    row["max_abs_diff_vs_default"] = (out.float() - default.float()).abs().max().item()
                    if not row["max_abs_diff_vs_default"] <= (1e-2 if shape.dtype != "float32" else 1e-5):
                        row["status"] = "wrong"
                    row["median_ms"] = statistics.median(timer.times_ms(calls[name]))
                row["vs_default"] = row["median_ms"] / default_ms
            except Exception as e:  # shared memory, registers: the compiler's refusal is a result too
                row["status"], row["error"] = "error", error_text(e)
            finally:
                cleanup(device.type == "cuda")
            rows.append(row)
            if "vs_default" in row:
                shown = f"{row['median_ms']:8.3f} ms ({row['vs_default']:.2f}x default)"
            else:
                shown = row.get("error", row["status"])
            print(f"d={shape.d:>3} {name:>16} {cfg}: {shown} [{row['status']}]", flush=True)
    return rows


def best_per_kernel(rows: list[dict]) -> list[dict]:
    out = []
    for name, d in dict.fromkeys((r["kernel"], r["d"]) for r in rows):
        mine = [r for r in rows if r["kernel"] == name and r["d"] == d]
        default = next(r for r in mine if r["config"] == "default")
        good = [r for r in mine if r["status"] == "ok" and r["config"] != "default"]
        if good:
            fastest = min(good, key=lambda r: r["median_ms"])
            out.append(dict(kernel=name, d=d, default_ms=default["median_ms"], best=fastest["config"],
                            best_ms=fastest["median_ms"], best_vs_default=fastest["vs_default"]))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--head-dims", type=int, nargs="*", default=[128, 64])
    add_run_options(parser, smoke_repeats=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the smoke run checks the kernels in the interpreter
    cuda, device, repeats, warmup = run_setup(parser, args, smoke_repeats=2)
    timer = Timer(cuda, warmup, repeats)
    if args.smoke:
        shapes = [Shape("prefill", b=1, hq=4, hkv=2, lq=64, lk=64, d=32, dtype="float32")]
        configs = [dict(block_m=m, block_n=16, num_warps=4, num_stages=1) for m in (16, 32)]
    else:
        shapes = [Shape("prefill", b=1, hq=32, hkv=8, lq=args.length, lk=args.length, d=d, dtype="bfloat16")
                  for d in args.head_dims]  # fmt: skip
        configs = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    name, compute_path = describe_path(device)
    config = run_config(cuda, repeats, warmup, args.smoke, length=shapes[0].lk, causal=True, dtype=shapes[0].dtype,
                        heads="32 query / 8 kv" if not args.smoke else "4 / 2",
                        grid=GRID if not args.smoke else configs)  # fmt: skip
    stem = report_stem("tiles", name, args.smoke)
    rows = []
    for shape in shapes:
        rows += sweep(shape, device, timer, configs)
        write_report(args.out_dir, stem, name, compute_path, config, best_per_kernel(rows), rows, quiet=True)
    best = best_per_kernel(rows)
    for b in best:
        print(f"d={b['d']:>3} {b['kernel']:>16}: default {b['default_ms']:.3f} ms, best {b['best_ms']:.3f} ms "
              f"({b['best_vs_default']:.2f}x) with {b['best']}")  # fmt: skip
    write_report(args.out_dir, stem, name, compute_path, config, best, rows)


if __name__ == "__main__":
    main()
