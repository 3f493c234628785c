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
import json
from collections.abc import Callable
from dataclasses import asdict

import torch
from common import (
    ACT,
    Provider,
    Shape,
    Timer,
    add_run_options,
    attention_shapes,
    describe_path,
    eager_act,
    make_inputs,
    measure_shape,
    plain_providers,
    report_stem,
    run_check,
    run_config,
    run_setup,
    sdpa_call,
    sink_positions,
    write_plot,
    write_report,
)

SUBSET_STRIDE = 5  # "20% of heads": every 5th query head


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

    factories = plain_providers(shape, q, k, v, cuda=cuda)
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


def previous_decode():
    """Decode as it ran before folding query-head groups into one program's rows and taking ACT's column mass from
    the flash pass's logits (`KernelOptions.fold_decode_groups` and `decode_mass_from_logits` off)."""
    from attnpatch.kernels import kernel_options

    return kernel_options(fold_decode_groups=False, decode_mass_from_logits=False)


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

    def attn_vs_sdpa():
        ctx = contextlib.nullcontext()
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        with ctx:
            ref = sdpa_call(q, k, v, causal)
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

    cuda = device.type == "cuda"
    run_check(report, attn_vs_sdpa, cuda=cuda, key="attention_vs_sdpa_max_abs_err")
    run_check(report, act_vs_eager(None), cuda=cuda, key="act_all_vs_eager")
    run_check(report, act_vs_eager(subset), cuda=cuda, key="act_20pct_vs_eager")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--providers", nargs="*", help="only these providers (default: all)")
    add_run_options(parser, smoke_repeats=3)
    args = parser.parse_args()
    cuda, device, repeats, warmup = run_setup(parser, args, smoke_repeats=3)
    dims, shapes = attention_shapes(args, smoke_decode_lengths=[64, 128])

    name, compute_path = describe_path(device)
    checks = []
    for first in (shapes[0], next((s for s in shapes if s.mode == "decode"), None)):
        if first is not None:
            checks.append(sanity(first, device))
            print("sanity:", json.dumps(checks[-1]), flush=True)

    timer = Timer(cuda, warmup, repeats)
    stem = report_stem("attention", name, args.smoke)
    config = run_config(
        cuda, repeats, warmup, args.smoke, **dims, causal_prefill=True, act=ACT,
        act_subset=f"every {SUBSET_STRIDE}th query head", hidden_sink_positions="key 0, Lk // 8, Lk // 2",
        flops="4 B Hq Lq Lk D (halved for causal prefill), attention-equivalent for ACT",
    )  # fmt: skip
    results = []
    for shape in shapes:
        results += measure_shape(shape, device, timer, set(args.providers) if args.providers else None, build_providers)
        write_report(args.out_dir, stem, name, compute_path, config, checks, results, quiet=True)
    json_path = write_report(args.out_dir, stem, name, compute_path, config, checks, results)
    write_plot(
        results, json_path, f"{name}; B={dims['b']} Hq={dims['hq']} Hkv={dims['hkv']} D={dims['d']} {dims['dtype']}"
    )


if __name__ == "__main__":
    main()
