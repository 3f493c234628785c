"""Attention forward cost on one GPU: SDPA (flash backend), FlexAttention, our Triton attention and ACT, and ACT
done eagerly like the authors' code (materialised probabilities).

    python benchmarks/bench_attention.py [--lengths 1024 2048 ...] [--decode-lengths 1024 ...] [--repeats 30]
                                         [--out-dir benchmarks/results] [--smoke]

Shapes: B=1, 32 query heads sharing 8 kv heads, head dim 128, bf16; causal prefill (Lq = Lk = L) and decode (one
query against Lk cached keys, with a running ACT statistic of Lk - 1 keys). The inputs carry attention sinks like a
trained model's (key 0 takes about half of each row's attention, two hidden sinks about 15% each), so ACT finds sinks
and runs its correction pass. Times are medians of `repeats` runs after warm-up, measured with CUDA events with the
L2 cache flushed before each run; TFLOP/s counts 4 B H Lq Lk D (halved for causal prefill) for every provider, ACT
included (attention-equivalent rate). Peak memory: the allocator's high-water mark during one call above what was
allocated just before it (`peak_extra_mb`: the inputs, the ACT history and the block mask do not count), and that plus
the q/k/v bytes (`peak_with_inputs_mb`). Results go to
`<out-dir>/attention_<device>.json` with a PNG plot beside it.

`--smoke` runs tiny fp32 shapes (L in {64, 128}, 4 heads / 2 kv heads, head dim 32) and also runs on CPU (SDPA's
default backend, our ops on whatever path ATTNPATCH_BACKEND selects, the eager ACT; wall-clock timing): a check of
this script, not a measurement.
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
SUBSET_STRIDE = 5  # "20% of heads": every 5th query head
HIDDEN_SINKS = (8, 2)  # hidden sinks at Lk // 8 and Lk // 2


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


# ----------------------------------------------------------------------------------------------------------- inputs


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


def sink_positions(lk: int) -> list[int]:
    return [0] + sorted({lk // n for n in HIDDEN_SINKS} - {0})


def make_history(shape: Shape, heads: int, device: torch.device, seed: int = 1):
    """A running ACT statistic over the Lk - 1 cached keys (decode): each key seen by the rows after it, column means
    ~1e-3 except the planted sinks (0.6 for key 0, 0.18 for the hidden ones)."""
    from attnpatch.kernels.column_mass import ColumnStats

    t = shape.lk - 1
    g = torch.Generator(device=device).manual_seed(seed)
    count = torch.arange(t, 0, -1, device=device, dtype=torch.float32).expand(shape.b, 1, t).contiguous()
    mean = torch.rand(shape.b, heads, t, generator=g, device=device) * 2e-3
    mean[..., 0] = 0.6
    for p in sink_positions(shape.lk)[1:]:
        if p < t:
            mean[..., p] = 0.18
    return ColumnStats(colsum=mean * count, count=count)


# ------------------------------------------------------------------------------------------------------- providers


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


def _sdpa_call(q, k, v, causal):
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:  # torch < 2.5 has no enable_gqa
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=causal)


@dataclass
class Provider:
    name: str
    fn: Callable[[], object]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""


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


def build_providers(shape: Shape, q, k, v, *, cuda: bool) -> list[tuple[str, Callable[[], Provider]]]:
    """(name, factory) pairs; a factory's setup may fail (the failure is recorded, the run goes on)."""
    from attnpatch.kernels.act import act_attention
    from attnpatch.kernels.attention import attention

    scale = shape.d**-0.5
    causal = shape.causal
    group = shape.hq // shape.hkv
    subset = torch.arange(0, shape.hq, SUBSET_STRIDE)
    subset_kv = subset // group
    decode = shape.mode == "decode"

    def sdpa() -> Provider:
        if not cuda:
            return Provider("sdpa", lambda: _sdpa_call(q, k, v, causal), note="default backend")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def ctx():
            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

        with ctx():  # fall back to repeated K/V where the flash backend takes no GQA
            try:
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                return Provider("sdpa_flash", lambda: _sdpa_call(q, k, v, causal), ctx, "enable_gqa=True")
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
        if decode:
            return Provider("flex", lambda: fn(q, k, v, scale=scale, enable_gqa=True), note="no block mask")

        def causal_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal_mod, B=None, H=None, Q_LEN=shape.lq, KV_LEN=shape.lk, device=q.device)
        return Provider("flex", lambda: fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True))

    def ours() -> Provider:
        return Provider("attnpatch_attention", lambda: attention(q, k, v, scale=scale, causal=causal))

    def act(name: str, heads: torch.Tensor | None) -> Callable[[], Provider]:
        def make() -> Provider:
            n = shape.hq if heads is None else len(heads)
            history = make_history(shape, n, q.device) if decode else None
            kv_index = None if heads is None else subset_kv
            dev_heads = None if heads is None else heads.to(q.device)

            def run():
                qq = q if dev_heads is None else q[:, dev_heads]
                return act_attention(
                    qq, k, v, scale=scale, causal=causal, kv_head_index=kv_index, history=history, **ACT
                ).out

            note = f"{n} of {shape.hq} query heads" + (
                f" (every {SUBSET_STRIDE}th, gather timed)" if heads is not None else ""
            )
            return Provider(name, run, note=note)

        return make

    def eager() -> Provider:
        history = make_history(shape, shape.hq, q.device) if decode else None
        return Provider(
            "eager_act",
            lambda: eager_act(q, k, v, scale=scale, causal=causal, history=history, **ACT)[0],
            note="materialised probabilities in the input dtype",
        )

    def unfolded(make: Callable[[], Provider], name: str) -> Callable[[], Provider]:
        def wrapped() -> Provider:
            p = make()
            return Provider(name, p.fn, previous_decode, p.note + "; one program per query head, two passes over K")

        return wrapped

    factories = [("sdpa_flash" if cuda else "sdpa", sdpa)]
    if cuda:
        factories.append(("flex", flex))
    factories += [
        ("attnpatch_attention", ours),
        ("attnpatch_act_20pct", act("attnpatch_act_20pct", subset)),
        ("attnpatch_act_all", act("attnpatch_act_all", None)),
        ("eager_act", eager),
    ]
    if decode:  # the decode path before NOTES.md's steps 1 and 2, measured beside it
        factories += [
            ("attnpatch_attention_unfolded", unfolded(ours, "attnpatch_attention_unfolded")),
            ("attnpatch_act_all_unfolded", unfolded(act("attnpatch_act_all", None), "attnpatch_act_all_unfolded")),
        ]
    return factories


@contextlib.contextmanager
def switched_off(*switches: tuple[object, str]):
    """Set each (module, name) switch to False for the duration (to time a previous code path beside the new one)."""
    saved = [getattr(module, name) for module, name in switches]
    for module, name in switches:
        setattr(module, name, False)
    try:
        yield
    finally:
        for (module, name), value in zip(switches, saved, strict=True):
            setattr(module, name, value)


def previous_decode():
    """Decode as it ran before folding query-head groups into one program's rows and taking ACT's column mass from
    the flash pass's logits (the switches `FOLD_DECODE_GROUPS`, `DECODE_MASS_FROM_LOGITS` off)."""
    from attnpatch.kernels import act as act_module
    from attnpatch.kernels._triton import flash

    return switched_off((flash, "FOLD_DECODE_GROUPS"), (act_module, "DECODE_MASS_FROM_LOGITS"))


# ------------------------------------------------------------------------------------------------------- measuring


class Timer:
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


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _cleanup(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_shape(
    shape: Shape, device: torch.device, timer: Timer, providers: set[str] | None, build: Callable | None = None
) -> list[dict]:
    """Time every provider of `build(shape, q, k, v, cuda=...)` (default: this script's) on one shape."""
    cuda = device.type == "cuda"
    q, k, v = make_inputs(shape, device)
    inputs_mb = sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**20
    rows = []
    for name, factory in (build or build_providers)(shape, q, k, v, cuda=cuda):
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
            row["status"] = "oom" if _is_oom(e) else "error"
            row["error"] = _error(e)
        finally:
            provider = None  # drop its buffers (history, block mask, repeated K/V) before the next one
            _cleanup(cuda)
        rows.append(row)
        shown = f"{row['median_ms']:10.3f} ms {row['tflops']:7.2f} TFLOP/s" if row["status"] == "ok" else row["error"]
        mem = f"  peak +{row['peak_extra_mb']:9.1f} MiB" if "peak_extra_mb" in row else ""
        print(f"{shape.mode:>7} Lq={shape.lq:>6} Lk={shape.lk:>6} {row['provider']:>22}: {shown}{mem}", flush=True)
    sdpa = next((r for r in rows if r["provider"].startswith("sdpa") and r["status"] == "ok"), None)
    for r in rows:
        if sdpa is not None and r["status"] == "ok":
            r["ratio_vs_sdpa"] = r["median_ms"] / sdpa["median_ms"]
    del q, k, v
    _cleanup(cuda)
    return rows


# ----------------------------------------------------------------------------------------------------------- sanity


def sanity(shape: Shape, device: torch.device) -> dict:
    """Max abs differences on one shape: our attention vs SDPA, our ACT (all heads, every 5th head) vs the eager ACT,
    sink sets compared; on small shapes also the eager ACT and ours against the float64 reference."""
    from attnpatch.kernels import reference
    from attnpatch.kernels.act import act_attention
    from attnpatch.kernels.attention import attention

    q, k, v = make_inputs(shape, device)
    scale = shape.d**-0.5
    causal = shape.causal
    decode = shape.mode == "decode"
    group = shape.hq // shape.hkv
    subset = torch.arange(0, shape.hq, SUBSET_STRIDE)
    report: dict = {"shape": asdict(shape)}

    def err(a, b) -> float:
        return (a.double() - b.double()).abs().max().item()

    def step(name, fn):
        try:
            report[name] = fn()
        except Exception as e:
            report[name] = "oom" if _is_oom(e) else _error(e)
        _cleanup(device.type == "cuda")

    def attn_vs_sdpa():
        ctx = contextlib.nullcontext()
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        with ctx:
            ref = _sdpa_call(q, k, v, causal)
        return err(attention(q, k, v, scale=scale, causal=causal), ref)

    def act_vs_eager(heads):
        def run():
            sel = torch.arange(shape.hq) if heads is None else heads
            kv_index = sel // group
            qq = q[:, sel.to(device)]
            hist = make_history(shape, len(sel), device) if decode else None
            ours = act_attention(qq, k, v, scale=scale, causal=causal, kv_head_index=kv_index, history=hist, **ACT)
            eager, eager_sinks = eager_act(
                qq, k, v, scale=scale, causal=causal, kv_head_index=kv_index, history=hist, **ACT
            )
            out = {
                "max_abs_err": err(ours.out, eager),
                "sinks_equal": bool(torch.equal(ours.sinks, eager_sinks)),
                "sinks_per_head": ours.sinks.sum(-1).float().mean().item(),
                "act_changes_output_by": err(ours.out, attention(qq, k, v, scale=scale, causal=causal,
                                                                 kv_head_index=kv_index)),
            }  # fmt: skip
            if shape.b * len(sel) * shape.lq * shape.lk <= 1 << 16:  # the float64 oracle loops over rows
                index = kv_index.to(device)  # one kv head per selected query head
                ref = reference.act(
                    qq, k[:, index], v[:, index], scale=scale, causal=causal,
                    history=None if hist is None else (hist.colsum, hist.count), **ACT,
                )  # fmt: skip
                out["max_abs_err_vs_reference"] = err(ours.out, ref["out"])
                out["eager_max_abs_err_vs_reference"] = err(eager, ref["out"])
                out["sinks_equal_reference"] = bool(torch.equal(ours.sinks, ref["sinks"]))
            return out

        return run

    step("attention_vs_sdpa_max_abs_err", attn_vs_sdpa)
    step("act_all_vs_eager", act_vs_eager(None))
    step("act_20pct_vs_eager", act_vs_eager(subset))
    return report


# ------------------------------------------------------------------------------------------------------------ output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if not name.startswith("cpu") else "cpu"


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


def describe_path(device: torch.device) -> tuple[str, dict]:
    """The device name and the attnpatch compute path for it (printed, and recorded in the report)."""
    from attnpatch.kernels import backend

    name = device_name(device)
    path, why = backend.describe(device)
    print(f"device: {name}; attnpatch ops: {path} ({why})", flush=True)
    return name, {"path": path, "why": why, "ATTNPATCH_BACKEND": backend.requested()}


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


def timing_note(cuda: bool) -> str:
    return "CUDA events, L2 flushed before each run" if cuda else "time.perf_counter"


def plot(results: list[dict], path: Path, title: str) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--providers", nargs="*", help="only these providers (default: all)")
    add_run_options(parser, smoke_repeats=3)
    args = parser.parse_args()
    cuda, device, repeats, warmup = run_setup(parser, args, smoke_repeats=3)
    if args.smoke:
        dims = dict(b=1, hq=4, hkv=2, d=32, dtype="float32")
        lengths, decode_lengths = [64, 128], [64, 128]
    else:
        dims = dict(b=1, hq=32, hkv=8, d=128, dtype="bfloat16")
        lengths, decode_lengths = args.lengths, args.decode_lengths
    shapes = [Shape("prefill", lq=n, lk=n, **dims) for n in lengths]
    shapes += [Shape("decode", lq=1, lk=n, **dims) for n in decode_lengths]

    name, compute_path = describe_path(device)
    checks = []
    for first in (shapes[0], next((s for s in shapes if s.mode == "decode"), None)):
        if first is not None:
            checks.append(sanity(first, device))
            print("sanity:", json.dumps(checks[-1]), flush=True)

    timer = Timer(cuda, warmup, repeats)
    stem = f"attention_{slug(name)}" + ("_smoke" if args.smoke else "")
    config = dict(
        dims,
        causal_prefill=True,
        act=ACT,
        act_subset=f"every {SUBSET_STRIDE}th query head",
        hidden_sink_positions="key 0, Lk // 8, Lk // 2",
        repeats=repeats,
        warmup=warmup,
        timing=timing_note(cuda),
        flops="4 B Hq Lq Lk D (halved for causal prefill), attention-equivalent for ACT",
        smoke=args.smoke,
    )  # fmt: skip
    results = []
    for shape in shapes:
        results += measure_shape(shape, device, timer, set(args.providers) if args.providers else None)
        write_report(args.out_dir, stem, name, compute_path, config, checks, results, quiet=True)
    json_path = write_report(args.out_dir, stem, name, compute_path, config, checks, results)
    try:
        png = json_path.with_suffix(".png")
        plot(results, png, f"{name}; B={dims['b']} Hq={dims['hq']} Hkv={dims['hkv']} D={dims['d']} {dims['dtype']}")
        print(f"wrote {png}")
    except Exception as e:  # the JSON is the result; a plotting problem must not lose it
        print(f"plot failed: {_error(e)}")


if __name__ == "__main__":
    main()
