"""CPU cost of ACT: end to end on Gemma-3 270M, and the op alone (chunked vs eager like the authors' code).

    python benchmarks/bench_act_cpu.py [--tokens 512] [--repeats 5] [--out benchmarks/results/act_cpu.json]

Each configuration runs in a fresh subprocess. Times are medians over `repeats` runs after one warm-up; peak memory
is the resident-set high-water mark during those runs (reset just before them) minus the resident set before them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _measure(config: str, tokens: int, run, repeats: int) -> dict:
    """Median wall time of `run` after one warm-up, and its peak resident memory above the resident set before it."""
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "config": config,
        "tokens": tokens,
        "median_ms": statistics.median(times),
        "times_ms": times,
        "peak_extra_mb": _status_mb("VmHWM") - before,
    }


def e2e(config: str, tokens: int, repeats: int) -> dict:
    """One end-to-end configuration: 'sdpa' (unpatched) or 'act' (defaults), full logits or last-token logits."""
    import attnpatch
    from attnpatch.eval import load_task
    from attnpatch.models import load

    model, tok = load("gemma-3-270m")
    text = "\n\n".join(item.context for item in load_task("boolq", limit=40))  # real passages
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    assert ids.shape[1] == tokens, f"sample text has only {ids.shape[1]} tokens"
    method, keep = config.split("/")
    if method == "act":
        attnpatch.apply(model, "act")
    kwargs = {"logits_to_keep": 1} if keep == "last" else {}

    def run():
        with torch.inference_mode():
            model(ids, **kwargs)

    return _measure(config, tokens, run, repeats)


def eager_act(q, k, v, *, scale: float, beta: float, threshold: float) -> torch.Tensor:
    """The authors' eager pipeline, vectorised (our re-expression, not their code): repeat K/V for every query head,
    materialise the [B, H, L, L] causal softmax, column means over visible rows, drop the first sink, rescale."""
    hq, lq = q.shape[1], q.shape[2]
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    causal = torch.ones(lq, lq, dtype=torch.bool).tril()
    probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), dim=-1)
    mean = probs.sum(dim=2) / torch.arange(lq, 0, -1)  # key j is seen by L - j rows
    sinks = mean > threshold
    sinks = sinks.scatter(-1, sinks.to(torch.uint8).argmax(-1, keepdim=True), False)
    s = (probs * sinks[:, :, None]).sum(-1, keepdim=True)
    weights = torch.where(sinks[:, :, None], torch.full_like(s, beta), (1 - beta * s) / (1 - s))
    return (probs * weights) @ v


def op(config: str, tokens: int, repeats: int) -> dict:
    """One Gemma-shaped layer (4 query heads, 1 kv head, head dim 256, causal): SDPA, ACT chunked, ACT eager."""
    from attnpatch.kernels.act import act_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, tokens, 256), torch.randn(1, 1, tokens, 256), torch.randn(1, 1, tokens, 256)
    act = dict(scale=256**-0.5, beta=0.4, threshold=0.1)
    runs = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.expand_as(q), v.expand_as(q), is_causal=True
        ),
        "act chunked": lambda: act_attention(q, k, v, causal=True, **act),
        "act eager": lambda: eager_act(q, k, v, **act),
    }
    return _measure(config, tokens, runs[config], repeats)


def _child(kind: str, config: str, tokens: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, config, "--tokens", str(tokens), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--op-tokens", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/act_cpu.json")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CONFIG"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.child:
        kind, config = args.child
        print(json.dumps((e2e if kind == "e2e" else op)(config, args.tokens, args.repeats)))
        return

    import transformers

    results = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "e2e": [_child("e2e", c, args.tokens, args.repeats) for c in ("sdpa/all", "act/all", "sdpa/last", "act/last")],
        "op": [_child("op", c, n, args.repeats) for n in args.op_tokens for c in ("sdpa", "act chunked", "act eager")],
    }
    by = {r["config"]: r for r in results["e2e"]}
    results["ratios"] = {
        "act_vs_sdpa_full_logits": by["act/all"]["median_ms"] / by["sdpa/all"]["median_ms"],
        "act_vs_sdpa_last_logits": by["act/last"]["median_ms"] / by["sdpa/last"]["median_ms"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for r in results["e2e"] + results["op"]:
        print(f"{r['config']:>14} L={r['tokens']:>5}: {r['median_ms']:9.1f} ms  peak +{r['peak_extra_mb']:7.1f} MB")
    print(json.dumps(results["ratios"], indent=2))


if __name__ == "__main__":
    main()
