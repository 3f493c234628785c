"""What the GPU benchmark scripts share (imported as `common` from the scripts' folder): the run options and setup,
timing and peak memory, the JSON report and plot, the attention shapes with planted sinks, the plain-attention
providers (SDPA, FlexAttention) and ACT done eagerly like the authors' code.

Not a script: bench_attention.py, bench_var.py, bench_outlook.py, bench_generate.py and tune_tiles.py import it.
Switching a kernel path for one provider is `attnpatch.kernels.kernel_options(...)` as the provider's context.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ACT = dict(beta=0.4, threshold=0.1)
HIDDEN_SINKS = (8, 2)  # hidden sinks at Lk // 8 and Lk // 2

# ------------------------------------------------------------------------------------------------ run options


def add_run_options(parser: argparse.ArgumentParser, *, smoke_repeats: int) -> None:
    """The options every GPU benchmark script takes: --out-dir, --repeats, --warmup, --smoke."""
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed runs per provider (default 30, smoke {smoke_repeats})"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5, smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes; runs on CPU too")


def run_setup(parser: argparse.ArgumentParser, args: argparse.Namespace, *, smoke_repeats: int):
    """(cuda, device, repeats, warmup) for a benchmark run; refuses a full run without CUDA. Without CUDA the
    smoke run uses at most 2 threads."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.smoke:
        parser.error("needs a CUDA GPU (use --smoke to check the script on CPU)")
    if not cuda:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    repeats = args.repeats or (smoke_repeats if args.smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    return cuda, device, repeats, warmup


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if not name.startswith("cpu") else "cpu"


def report_stem(prefix: str, name: str, smoke: bool) -> str:
    """The report's file stem: `<prefix>_<device slug>`, `_smoke` appended for a smoke run."""
    return f"{prefix}_{slug(name)}" + ("_smoke" if smoke else "")


def run_config(cuda: bool, repeats: int, warmup: int, smoke: bool, *, timing: str | None = None, **specific) -> dict:
    """A report's `config`: the script's own entries, then repeats, warmup, timing (default `timing_note`) and smoke."""
    timing = timing_note(cuda) if timing is None else timing
    return dict(specific, repeats=repeats, warmup=warmup, timing=timing, smoke=smoke)


def describe_path(device: torch.device) -> tuple[str, dict]:
    """The device name and the attnpatch compute path for it (printed, and recorded in the report)."""
    from attnpatch.kernels import backend

    name = device_name(device)
    path, why = backend.describe(device)
    print(f"device: {name}; attnpatch ops: {path} ({why})", flush=True)
    return name, {"path": path, "why": why, "ATTNPATCH_BACKEND": backend.requested()}


# ---------------------------------------------------------------------------------------------------- measuring


@dataclass
class Provider:
    """One timed callable; `context` (e.g. `functools.partial(kernel_options, ...)`) wraps its warm-up and timing."""

    name: str
    fn: Callable[[], object]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""


class Timer:
    """Times of `repeats` calls after `warmup` untimed ones: CUDA events with the L2 cache flushed before each call,
    or wall clock off the GPU."""

    def __init__(self, cuda: bool, warmup: int, repeats: int):
        self.cuda, self.warmup, self.repeats = cuda, warmup, repeats
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if cuda else None

    def times_ms(self, fn) -> list[float]:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            return times
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.repeats)
        ]
        for start, end in events:
            self.flush.zero_()  # L2 flush, outside the timed interval
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def call_ms(fn: Callable[[], object], cuda: bool, warmup: int, repeats: int) -> list[float]:
    """Times of `repeats` calls of `fn` after `warmup` untimed ones (CUDA events around each call, or wall clock)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def timing_note(cuda: bool) -> str:
    return "CUDA events, L2 flushed before each run" if cuda else "time.perf_counter"


def peak_extra_mb(fn) -> float:
    """Peak allocated memory during one call of `fn` above what was allocated just before it (inputs, ACT history,
    block mask, the timer's L2-flush buffer), in MiB."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


def error_text(e: BaseException) -> str:
    """One line for a report: the exception's type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def failure(e: BaseException) -> str:
    """What a report records for a failed check: "oom", or the error's line."""
    return "oom" if is_oom(e) else error_text(e)


def run_check(report: dict, check: Callable[[], object], *, cuda: bool, key: str | None = None) -> None:
    """Put `check()`'s result in `report` under `key` (without a key: merge the dict it returns), or, when it raises,
    `failure(e)` there (without a key: under "error"), so that one failing check does not end the run; then free what
    it left behind."""
    try:
        result = check()
        if key is None:
            report.update(result)
        else:
            report[key] = result
    except Exception as e:
        report["error" if key is None else key] = failure(e)
    cleanup(cuda)


def record_failure(row: dict, e: BaseException) -> None:
    """Mark a measured row as failed: status "oom" or "error", and the error's line."""
    row["status"] = "oom" if is_oom(e) else "error"
    row["error"] = error_text(e)


def cleanup(cuda: bool) -> None:
    """Free what the last provider left behind (and its cached GPU blocks)."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ attention inputs


@dataclass(frozen=True)
class Shape:
    mode: str  # "prefill" (causal, Lq = Lk) or "decode" (Lq = 1, every key visible)
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    dtype: str

    @property
    def causal(self) -> bool:
        return self.mode == "prefill"

    def flops(self) -> float:
        """4 B H Lq Lk D, halved for a causal prefill (half the logits are masked)."""
        f = 4.0 * self.b * self.hq * self.lq * self.lk * self.d
        return f / 2 if self.causal and self.lq == self.lk else f


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    """q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D] with planted sinks: coordinate 0 of q is a constant and that of k is 0
    except at key 0 and the hidden sinks, whose logits are raised so that the last query row gives key 0 about 50% of
    its attention and each hidden sink about 15% (random keys: logits ~ N(0, 1), total weight ~ 1.65 Lk)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    q = torch.randn(shape.b, shape.hq, shape.lq, shape.d, generator=g, device=device)
    k = torch.randn(shape.b, shape.hkv, shape.lk, shape.d, generator=g, device=device)
    v = torch.randn(shape.b, shape.hkv, shape.lk, shape.d, generator=g, device=device)
    scale = shape.d**-0.5
    a = 8.0
    q[..., 0] = a
    k[..., 0] = 0.0
    rest = math.log(1.65 * shape.lk)  # log of the non-sink keys' total weight for the last row
    k[:, :, 0, 0] = (rest + math.log(2.5)) / (a * scale)
    for p in sink_positions(shape.lk)[1:]:
        k[:, :, p, 0] = (rest + math.log(0.75)) / (a * scale)
    return q.to(dtype), k.to(dtype), v.to(dtype)


SMOKE_DIMS = dict(b=1, hq=4, hkv=2, d=32, dtype="float32")
DIMS = dict(b=1, hq=32, hkv=8, d=128, dtype="bfloat16")


def attention_shapes(args: argparse.Namespace, *, smoke_decode_lengths: list[int]) -> tuple[dict, list[Shape]]:
    """(dims, shapes): causal prefill at `args.lengths` and decode at `args.decode_lengths` with `DIMS`; with
    `args.smoke`, prefill at 64 and 128 and decode at `smoke_decode_lengths` with the tiny fp32 `SMOKE_DIMS`."""
    if args.smoke:
        dims, lengths, decode_lengths = SMOKE_DIMS, [64, 128], smoke_decode_lengths
    else:
        dims, lengths, decode_lengths = DIMS, args.lengths, args.decode_lengths
    shapes = [Shape("prefill", lq=n, lk=n, **dims) for n in lengths]
    return dict(dims), shapes + [Shape("decode", lq=1, lk=n, **dims) for n in decode_lengths]


def sink_positions(lk: int) -> list[int]:
    return [0] + sorted({lk // n for n in HIDDEN_SINKS} - {0})


# ----------------------------------------------------------------------------------- shared providers and ACT


def sdpa_call(q, k, v, causal):
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:  # torch < 2.5 has no enable_gqa
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=causal)


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("recompile_limit", "cache_size_limit"):  # one compiled graph per shape
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def plain_providers(shape: Shape, q, k, v, *, cuda: bool) -> list[tuple[str, Callable[[], Provider]]]:
    """(name, factory) pairs of the plain attention baselines: SDPA (its flash backend on CUDA) and, on CUDA,
    FlexAttention; a factory's setup may fail (the failure is recorded, the run goes on)."""
    scale = shape.d**-0.5
    causal = shape.causal
    group = shape.hq // shape.hkv

    def sdpa() -> Provider:
        if not cuda:
            return Provider("sdpa", lambda: sdpa_call(q, k, v, causal), note="default backend")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def ctx():
            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

        with ctx():  # fall back to repeated K/V where the flash backend takes no GQA
            try:
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                return Provider("sdpa_flash", lambda: sdpa_call(q, k, v, causal), ctx, "enable_gqa=True")
            except (RuntimeError, TypeError):
                kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                return Provider(
                    "sdpa_flash",
                    lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal),
                    ctx,
                    "K/V repeated outside the timing (flash backend refused enable_gqa)",
                )

    def flex() -> Provider:
        from torch.nn.attention.flex_attention import create_block_mask

        fn = _flex()
        if shape.mode == "decode":
            return Provider("flex", lambda: fn(q, k, v, scale=scale, enable_gqa=True), note="no block mask")

        def causal_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal_mod, B=None, H=None, Q_LEN=shape.lq, KV_LEN=shape.lk, device=q.device)
        return Provider("flex", lambda: fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True))

    return [("sdpa_flash" if cuda else "sdpa", sdpa)] + ([("flex", flex)] if cuda else [])


def eager_act(q, k, v, *, scale, beta, threshold, causal, kv_head_index=None, history=None, return_stats=False):
    """ACT the way the authors' code does it (our compact re-expression, not their code): K/V repeated for every query
    head, the [B, H, Lq, Lk] logits and softmax probabilities materialised in the input dtype (softmax computed in
    float32 as transformers' eager attention does), column means over the rows that see each key (plus the running
    history when decoding), sinks above the threshold minus the first one, each row's sink probabilities times beta
    and the freed mass spread over its other keys in proportion. Same semantics as `kernels.reference.act`.
    Returns (out [B, Hq, Lq, D], sinks [B, Hq, Lk]), and the running statistic over the Lk keys with
    `return_stats` (what the next decoding step continues)."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    if kv_head_index is None:
        kv_head_index = torch.arange(hq) // (hq // k.shape[1])
    index = kv_head_index.to(q.device)
    k, v = k[:, index], v[:, index]
    logits = (q @ k.transpose(-1, -2)) * scale
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(lk - lq)  # queries are the last Lq positions
        logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    del logits
    colsum = probs.sum(dim=2, dtype=torch.float32)  # [B, H, Lk]
    count = visible.sum(0, dtype=torch.float32).expand(b, 1, lk)
    if history is not None:
        t = history.colsum.shape[-1]
        colsum = torch.cat([colsum[..., :t] + history.colsum, colsum[..., t:]], dim=-1)
        count = torch.cat([count[..., :t] + history.count, count[..., t:]], dim=-1)
    mean = torch.where(count > 0, colsum / count.clamp_min(1.0), torch.zeros_like(colsum))
    sinks = mean > threshold
    sinks = sinks.scatter(-1, sinks.to(torch.uint8).argmax(-1, keepdim=True), False)  # keep the first sink
    sink_w = sinks[:, :, None, :]
    s = (probs * sink_w).sum(-1, keepdim=True, dtype=torch.float32)  # sink mass per row
    rest = probs.sum(-1, keepdim=True, dtype=torch.float32) - s
    live = rest > 0  # a row that sees only sinks is left alone
    c = torch.where(live, 1.0 + (1.0 - beta) * s / rest.clamp_min(1e-30), torch.ones_like(s))
    w = torch.where(sink_w, torch.where(live, beta, 1.0), c).to(q.dtype)
    if return_stats:
        from attnpatch.kernels.column_mass import ColumnStats

        return (probs * w) @ v, sinks, ColumnStats(colsum=colsum, count=count)
    return (probs * w) @ v, sinks


def measure_shape(
    shape: Shape, device: torch.device, timer: Timer, providers: set[str] | None, build: Callable
) -> list[dict]:
    """Time every provider of `build(shape, q, k, v, cuda=...)` on the inputs of one shape (`make_inputs`)."""
    cuda = device.type == "cuda"
    q, k, v = make_inputs(shape, device)
    inputs_mb = sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**20
    rows = []
    for name, factory in build(shape, q, k, v, cuda=cuda):
        if providers and name not in providers:
            continue
        row = dict(asdict(shape), inputs_mb=inputs_mb, provider=name, status="ok")
        try:
            provider = factory()
            row["note"] = provider.note
            with provider.context():
                times = timer.times_ms(provider.fn)
                if cuda:
                    row["peak_extra_mb"] = peak_extra_mb(provider.fn)
                    row["peak_with_inputs_mb"] = row["peak_extra_mb"] + inputs_mb
            med = statistics.median(times)
            row.update(median_ms=med, min_ms=min(times), repeats=len(times), tflops=shape.flops() / (med * 1e-3) / 1e12)
        except Exception as e:  # one provider's failure must not end the run
            record_failure(row, e)
        finally:
            provider = None  # drop its buffers (history, block mask, repeated K/V) before the next one
            cleanup(cuda)
        rows.append(row)
        shown = f"{row['median_ms']:10.3f} ms {row['tflops']:7.2f} TFLOP/s" if row["status"] == "ok" else row["error"]
        mem = f"  peak +{row['peak_extra_mb']:9.1f} MiB" if "peak_extra_mb" in row else ""
        print(f"{shape.mode:>7} Lq={shape.lq:>6} Lk={shape.lk:>6} {row['provider']:>22}: {shown}{mem}", flush=True)
    sdpa = next((r for r in rows if r["provider"].startswith("sdpa") and r["status"] == "ok"), None)
    for r in rows:
        if sdpa is not None and r["status"] == "ok":
            r["ratio_vs_sdpa"] = r["median_ms"] / sdpa["median_ms"]
    del q, k, v
    cleanup(cuda)
    return rows


# ------------------------------------------------------------------------------------------------------ output


def versions() -> dict:
    import attnpatch
    from attnpatch.kernels import backend

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    out["triton"] = backend.triton_version()
    out["attnpatch"] = attnpatch.__version__
    try:
        here = Path(__file__).resolve().parent
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        out["git_commit"] = None
    return out


def write_report(
    out_dir: str | Path, stem: str, name: str, compute_path: dict, config: dict, sanity, results, *, quiet=False
) -> Path:
    """Write the benchmark JSON (device, versions, path, config, sanity checks, results); returns its path. The
    scripts write it after every shape too (`quiet`), so a run cut short by a time limit keeps what it measured."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name,
        "versions": versions(),
        "attnpatch_path": compute_path,
        "config": config,
        "sanity": sanity,
        "results": results,
    }
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2))
    if not quiet:
        print(f"wrote {json_path}")
    return json_path


def plot(results: list[dict], path: Path, title: str) -> None:
    """Median time against length, one panel per mode (prefill, decode), one line per provider; OOMs annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("prefill", "decode") if any(r["mode"] == m for r in results)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = [r for r in results if r["mode"] == mode and r["status"] == "ok"]
        for name in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["lk"], r["median_ms"]) for r in rows if r["provider"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for r in results:
            if r["mode"] == mode and r["status"] == "oom":
                ax.annotate(f"{r['provider']} OOM", (r["lk"], ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L (prefill, Lq = Lk)" if mode == "prefill" else "Lk (decode, Lq = 1)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plot(results: list[dict], json_path: Path, title: str) -> None:
    """`plot` beside the JSON (same stem, .png); a plotting problem is printed, never raised (the JSON is the
    result)."""
    try:
        png = json_path.with_suffix(".png")
        plot(results, png, title)
        print(f"wrote {png}")
    except Exception as e:
        print(f"plot failed: {error_text(e)}")
