"""VOLO outlook attention on one GPU: attnpatch's fused op vs timm's unfold/softmax/AV/fold, forward and
forward+backward, at the stage-1 shapes of VOLO-D1..D5.

    python benchmarks/bench_outlook.py [--models d1 d5] [--batches 64 128] [--dtypes bfloat16 float32]
                                       [--repeats 30] [--out-dir benchmarks/results] [--smoke]

Shapes: a 28x28 stage-1 grid (224 px input), K=3, padding 1, stride 2 (14x14 windows); channels/heads per model from
the VOLO paper's Table 1 (D1 192/6, D2 and D3 256/8, D4 and D5 384/12). Two levels, both timed the same way:
- `op`: from the two linear outputs (v [B, 28, 28, C], logits [B, 14, 14, heads*81]) to the folded result in
  channels-last layout, i.e. exactly the part the fused op replaces. timm's lines are `reference.outlook(...,
  dtype=input dtype)` (timm's forward verbatim; its channels-last result is a permuted view, no copy).
- `module`: the whole `timm.models.volo.OutlookAttention` (linears, pooling, proj included), unpatched vs patched
  with `attnpatch.apply(..., "outlook")`.
Modes: `fwd` (no autograd graph) and `fwd+bwd` (gradients of the inputs, and of the parameters at module level).
Times: median of `repeats` runs after warm-up, CUDA events, L2 flushed before each run. Peak memory: the allocator's
high-water mark during one call above what was allocated before it. Bandwidth: the bytes the op must move at least
(fwd: read logits and v, write out; bwd: read logits, v, grad_out and the fp32 LSE, write both gradients; the forward
also writes the LSE when a backward follows) over the median time, and as a fraction of the device's copy bandwidth
(a 1 GiB device-to-device copy, read + write). Results go to `<out-dir>/outlook_<device>.json`.

`--smoke` runs tiny fp32 shapes and also runs on CPU (wall-clock timing, whatever path ATTNPATCH_BACKEND selects): a
check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass

import torch
from common import (
    Timer,
    add_run_options,
    cleanup,
    describe_path,
    peak_extra_mb,
    record_failure,
    report_stem,
    run_check,
    run_config,
    run_setup,
    write_report,
)

MODELS = {"d1": (192, 6), "d2": (256, 8), "d3": (256, 8), "d4": (384, 12), "d5": (384, 12)}
K, PAD, STRIDE = 3, 1, 2


@dataclass(frozen=True)
class Shape:
    model: str
    b: int
    hw: int  # stage-1 grid side
    c: int
    heads: int
    dtype: str

    @property
    def grid(self) -> int:
        return (self.hw + 2 * PAD - K) // STRIDE + 1

    def bytes_moved(self, backward: bool) -> int:
        """The least traffic of the op: forward, plus the backward when `backward`."""
        size = torch.finfo(getattr(torch, self.dtype)).bits // 8
        feature = self.b * self.hw * self.hw * self.c * size
        logits = self.b * self.grid**2 * self.heads * K**4 * size
        lse = self.b * self.grid**2 * self.heads * K**2 * 4
        forward = logits + 2 * feature
        if not backward:
            return forward
        return forward + lse + (logits + 2 * feature + lse) + (logits + feature)


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    """logits [B, h, w, heads*81] of O(1) after scaling (a peaked softmax, like a trained VOLO), v [B, H, W, C]."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    head_dim = shape.c // shape.heads
    logits = torch.randn(shape.b, shape.grid, shape.grid, shape.heads * K**4, generator=g, device=device)
    v = torch.randn(shape.b, shape.hw, shape.hw, shape.c, generator=g, device=device)
    return (2 * head_dim**0.5 * logits).to(dtype), v.to(dtype)


def timm_op(logits, v, scale):
    from attnpatch.kernels import reference

    return reference.outlook(logits, v, K, PAD, STRIDE, scale, dtype=v.dtype)


def ours_op(logits, v, scale):
    from attnpatch.kernels.outlook import outlook_attention

    return outlook_attention(logits, v, K, PAD, STRIDE, scale)


def op_runner(fn, logits, v, scale, backward: bool):
    if not backward:

        def run():
            with torch.no_grad():
                return fn(logits, v, scale)

        return run
    lg, vv = logits.detach().requires_grad_(), v.detach().requires_grad_()
    grad = torch.randn_like(v)

    def run_bwd():
        out = fn(lg, vv, scale)
        return torch.autograd.grad(out, (lg, vv), grad)

    return run_bwd


def module_runner(module, x, backward: bool):
    if not backward:

        def run():
            with torch.no_grad():
                return module(x)

        return run
    xx = x.detach().requires_grad_()
    inputs = [xx, *module.parameters()]
    grad = torch.randn_like(x)

    def run_bwd():
        return torch.autograd.grad(module(xx), inputs, grad)

    return run_bwd


def measure(shape: Shape, device: torch.device, timer: Timer, copy_gbs: float | None) -> list[dict]:
    from timm.models.volo import OutlookAttention

    import attnpatch

    cuda = device.type == "cuda"
    dtype = getattr(torch, shape.dtype)
    scale = (shape.c // shape.heads) ** -0.5
    logits, v = make_inputs(shape, device)
    torch.manual_seed(0)
    module = OutlookAttention(shape.c, shape.heads, K, PAD, STRIDE).to(device=device, dtype=dtype)
    x = torch.randn(shape.b, shape.hw, shape.hw, shape.c, device=device, dtype=dtype)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        backward = mode == "fwd+bwd"
        cases = [
            ("op", "timm", lambda b=backward: op_runner(timm_op, logits, v, scale, b), None),
            ("op", "attnpatch", lambda b=backward: op_runner(ours_op, logits, v, scale, b), None),
            ("module", "timm", lambda b=backward: module_runner(module, x, b), None),
            ("module", "attnpatch", lambda b=backward: module_runner(module, x, b), "patch"),
        ]
        for level, provider, make, patched in cases:
            row = dict(asdict(shape), mode=mode, level=level, provider=provider, status="ok")
            patch = attnpatch.apply(module, "outlook") if patched else None
            try:
                fn = make()
                times = timer.times_ms(fn)
                if cuda:
                    row["peak_extra_mb"] = peak_extra_mb(fn)
                med = statistics.median(times)
                row.update(median_ms=med, min_ms=min(times), repeats=len(times))
                if level == "op":
                    gbs = shape.bytes_moved(backward) / (med * 1e-3) / 1e9
                    row["achieved_gb_s"] = gbs
                    if copy_gbs:
                        row["fraction_of_copy_bw"] = gbs / copy_gbs
            except Exception as e:  # one provider's failure must not end the run
                record_failure(row, e)
            finally:
                if patch is not None:
                    patch.remove()
                cleanup(cuda)
            rows.append(row)
            print(_line(row), flush=True)
        for level in ("op", "module"):
            pair = {r["provider"]: r for r in rows if r["mode"] == mode and r["level"] == level and r["status"] == "ok"}
            if len(pair) == 2:
                pair["attnpatch"]["speedup_vs_timm"] = pair["timm"]["median_ms"] / pair["attnpatch"]["median_ms"]
    return rows


def _line(row: dict) -> str:
    head = f"{row['model']} B={row['b']:>4} {row['dtype']:>8} {row['mode']:>7} {row['level']:>6} {row['provider']:>9}"
    if row["status"] != "ok":
        return f"{head}: {row['error']}"
    mem = f"  peak +{row['peak_extra_mb']:8.1f} MiB" if "peak_extra_mb" in row else ""
    bw = f"  {row['achieved_gb_s']:7.1f} GB/s" if "achieved_gb_s" in row else ""
    return f"{head}: {row['median_ms']:9.3f} ms{bw}{mem}"


def copy_bandwidth(timer: Timer, device: torch.device, size_bytes: int) -> float:
    """GB/s of a device-to-device copy of `size_bytes` (read + write counted)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(timer.times_ms(lambda: dst.copy_(src)))
    return 2 * size_bytes / (ms * 1e-3) / 1e9


def sanity(shape: Shape, device: torch.device) -> dict:
    """Max abs errors of our op and of timm's lines (at the input dtype) against the float64 oracle, forward and
    gradients, on one shape."""
    from attnpatch.kernels import reference

    logits, v = make_inputs(shape, device)
    scale = (shape.c // shape.heads) ** -0.5
    grad = torch.randn_like(v, dtype=torch.float64)
    report: dict = {"shape": asdict(shape)}

    def run(fn, a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        out = fn(a, b, scale)
        da, db = torch.autograd.grad(out, (a, b), grad.to(out.dtype))
        return out.double(), da.double(), db.double()

    def check() -> dict:
        ref = run(lambda a, b, s: reference.outlook(a, b, K, PAD, STRIDE, s), logits.double(), v.double())
        errors = {}
        for name, fn in (("attnpatch", ours_op), ("timm", timm_op)):
            got = run(fn, logits, v)
            errors[name] = {
                k: (x - r).abs().max().item() for k, x, r in zip(("out", "d_logits", "d_v"), got, ref, strict=True)
            }
        return errors

    run_check(report, check, cuda=device.type == "cuda")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    add_run_options(parser, smoke_repeats=2)
    args = parser.parse_args()
    cuda, device, repeats, warmup = run_setup(parser, args, smoke_repeats=2)
    if args.smoke:
        shapes = [Shape("d1-tiny", b=2, hw=9, c=32, heads=2, dtype="float32")]
    else:
        shapes = [
            Shape(m, b=b, hw=28, c=MODELS[m][0], heads=MODELS[m][1], dtype=dt)
            for dt in args.dtypes
            for m in args.models
            for b in args.batches
        ]

    name, compute_path = describe_path(device)
    timer = Timer(cuda, warmup, repeats)
    copy_gbs = copy_bandwidth(timer, device, (1 << 30) if cuda else (64 << 20))
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s", flush=True)
    check = sanity(shapes[0] if args.smoke else Shape("d1", 8, 28, 192, 6, shapes[0].dtype), device)
    print("sanity:", json.dumps(check), flush=True)

    stem = report_stem("outlook", name, args.smoke)
    config = run_config(
        cuda, repeats, warmup, args.smoke, kernel_size=K, padding=PAD, stride=STRIDE, copy_gb_s=copy_gbs,
        levels="op: linear outputs -> folded channels-last result; module: whole timm OutlookAttention",
    )  # fmt: skip
    results = []
    for shape in shapes:
        results += measure(shape, device, timer, copy_gbs)
        write_report(args.out_dir, stem, name, compute_path, config, check, results, quiet=True)
    write_report(args.out_dir, stem, name, compute_path, config, check, results)


if __name__ == "__main__":
    main()
