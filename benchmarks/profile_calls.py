"""Where one op call's time goes on the GPU: host time against device time, kernel launches and host read-backs.

    python benchmarks/profile_calls.py [--out-dir DIR] [--repeats 20] [--smoke]

For each shape of `bench_attention.py` (B=1, 32 query / 8 kv heads, D=128, bf16; causal prefill at 1k and 16k,
decode at 1k and 16k) and each provider (SDPA, our attention, ACT on all heads, VAR), it measures:
- `device_ms`: median CUDA-event time of one call (warm, no L2 flush: the fixed costs are what this looks at);
- `host_ms`: median wall time of the Python call without synchronising (launch and host-side work). When host_ms
  is close to device_ms the call is host-bound, and a faster kernel would not show;
- `launches`, `syncs`, `readbacks` per call, from torch.profiler: device kernels, cudaStreamSynchronize /
  cudaDeviceSynchronize / device-to-host copies, and `aten::item` / `aten::_local_scalar_dense`;
- the top kernels by device time.
Writes `<out-dir>/profile_calls_<device>.json` and prints a table. `--smoke` runs tiny fp32 shapes on CPU (a check
of the script; the CPU has no device events, so device_ms is the wall time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_var import VAR, layout
from common import ACT, DIMS, SMOKE_DIMS, Shape, call_ms, device_name, make_inputs, sdpa_call, slug, versions

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
READBACK_NAMES = ("aten::item", "aten::_local_scalar_dense")


def providers(shape: Shape, q, k, v) -> dict:
    from attnpatch.kernels.act import act_attention
    from attnpatch.kernels.attention import attention
    from attnpatch.kernels.var import var_attention

    scale, causal = shape.d**-0.5, shape.causal
    sinks, image, rows = layout(shape, q.device)  # bench_var.py's LLaVA-style sequence
    return {
        "sdpa": lambda: sdpa_call(q, k, v, causal),
        "attention": lambda: attention(q, k, v, scale=scale, causal=causal),
        "act_all": lambda: act_attention(q, k, v, scale=scale, causal=causal, **ACT).out,
        "var": lambda: (
            var_attention(q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=causal, **VAR).out
        ),
    }


def host_ms(fn, cuda: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(times)


def counts(fn, cuda: bool, calls: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kernel: dict[str, float] = {}
    for e in kernels:
        per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time_total / 1e3 / calls
    cpu_names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    d2h = sum(1 for e in events if e.name == "cudaMemcpyAsync" and "DtoH" in str(getattr(e, "input_shapes", "")))
    return {
        "launches": len(kernels) / calls,
        "syncs": (sum(cpu_names.count(n) for n in SYNC_NAMES) + d2h) / calls,
        "readbacks": sum(cpu_names.count(n) for n in READBACK_NAMES) / calls,
        "memcpy_calls": cpu_names.count("cudaMemcpyAsync") / calls,
        "top_kernels_ms": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:6]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dims = SMOKE_DIMS if args.smoke else DIMS
    lengths = [64, 128] if args.smoke else [1024, 16384]
    shapes = [Shape("prefill", lq=n, lk=n, **dims) for n in lengths]
    shapes += [Shape("decode", lq=1, lk=n, **dims) for n in lengths]
    rows = []
    for shape in shapes:
        q, k, v = make_inputs(shape, device)
        for name, fn in providers(shape, q, k, v).items():
            row = {"mode": shape.mode, "lk": shape.lk, "provider": name}
            try:
                for _ in range(3):
                    fn()
                row["device_ms"] = statistics.median(call_ms(fn, cuda, 0, args.repeats))
                row["host_ms"] = host_ms(fn, cuda, args.repeats)
                row.update(counts(fn, cuda))
            except Exception as e:  # recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(
                f"{shape.mode:>7} L={shape.lk:>6} {name:>10}: device {row.get('device_ms', float('nan')):8.3f} ms"
                f"  host {row.get('host_ms', float('nan')):8.3f} ms  launches {row.get('launches', 0):5.1f}"
                f"  syncs {row.get('syncs', 0):4.1f}  readbacks {row.get('readbacks', 0):4.1f}"
                + (f"  ERROR {row['error']}" if "error" in row else ""),
                flush=True,
            )
    name = device_name(device)
    out = Path(args.out_dir) / f"profile_calls_{slug(name)}{'_smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "versions": versions(), "dims": dims, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
