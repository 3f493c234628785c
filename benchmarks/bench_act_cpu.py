"""CPU cost of ACT and VAR against SDPA: one layer, the whole Gemma-3 270M forward, and the wall time of a fixed small
calibration and a fixed evaluation slice.

    python benchmarks/bench_act_cpu.py [--parts layer model workloads] [--before REF]

- layer: one Gemma-shaped layer (4 query heads, 1 kv head, head dim 256, causal, fp32) at --layer-tokens, with 1 and
  2 threads: SDPA, attnpatch attention with its LSE, ACT, VAR (a LLaVA-style sequence: 5 text tokens, an image up to
  the last 64 tokens, 2 visual sinks; VAR may change the 64 text rows after the image) and ACT done eagerly like the
  authors' code (up to 4096 tokens). The providers of one (tokens, threads) run in one process, round-robin, so the
  ratios come from the same run; peak memory is measured per provider in a fresh process (1 thread).
- model: Gemma-3 270M forward on real text (BoolQ passages), last-token logits, unpatched vs `act` with its default
  heads, round-robin in one process, at --model-tokens with 2 threads.
- workloads: the wall time of `calibrate_act` on 16 COPA items over two layers' heads, and of `evaluate` on 32 BoolQ
  items (unpatched and ACT), 2 threads.

--before REF also runs the layer (1 thread) and workload parts on the attnpatch of git revision REF (a temporary
worktree), for the speed-up of this revision over REF in the same run. Times are medians over --repeats runs after
a warm-up. Writes JSON, a markdown table and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import eager_act  # the authors' eager pipeline, shared with the GPU benchmarks

ROOT = Path(__file__).resolve().parent.parent
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 256
ACT = dict(beta=0.4, threshold=0.1)
TEXT_AFTER_IMAGE = 64
EAGER_MAX_TOKENS = 4096


# ------------------------------------------------------------------------------------------------ measuring


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def round_robin(runs: dict, repeats: int) -> dict[str, dict]:
    """Median wall time (ms) of each run after one warm-up, the runs interleaved so that load shifts hit them all."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: {"median_ms": statistics.median(t), "times_ms": t} for name, t in times.items()}


def peak_extra_mb(run) -> float:
    """Resident-set high-water mark of one run above the resident set before it (after one warm-up run)."""
    run()
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    run()
    return _status_mb("VmHWM") - before


# ------------------------------------------------------------------------------------------------ the parts


def layer_providers(tokens: int) -> dict:
    """name -> zero-argument run for one Gemma-shaped layer of `tokens` tokens (planted sinks, LLaVA-style VAR)."""
    from attnpatch.kernels.act import act_attention
    from attnpatch.kernels.attention import attention
    from attnpatch.kernels.var import var_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g)
    k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g)
    v = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g)
    u = torch.randn(HEAD_DIM, generator=g)
    u /= u.norm()
    scale = HEAD_DIM**-0.5
    q += 4.0 * u
    for sink in (0, tokens // 8, tokens // 2):  # the first sink and two hidden ones: each row's logit + ln(L) + 1
        k[:, :, sink] += (math.log(tokens) + 1.0) / (4.0 * scale) * u
    image = torch.zeros(1, tokens, dtype=torch.bool)
    image[:, 5 : tokens - TEXT_AFTER_IMAGE] = True
    sinks = torch.zeros(1, tokens, dtype=torch.bool)
    sinks[:, [0, tokens // 8, tokens // 2]] = True
    rows = torch.zeros(1, tokens, dtype=torch.bool)
    rows[:, tokens - TEXT_AFTER_IMAGE :] = True
    providers = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.expand_as(q), v.expand_as(q), is_causal=True, scale=scale
        ),
        "attention+lse": lambda: attention(q, k, v, scale=scale, causal=True, return_lse=True),
        "act": lambda: act_attention(q, k, v, scale=scale, causal=True, **ACT),
        "var": lambda: var_attention(q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=True),
    }
    if tokens <= EAGER_MAX_TOKENS:
        providers["act eager"] = lambda: eager_act(q, k, v, scale=scale, causal=True, **ACT)[0]
    return providers


def layer(tokens: int, threads: int, repeats: int, provider: str | None) -> dict:
    torch.set_num_threads(threads)
    providers = layer_providers(tokens)
    if provider is not None:  # memory of one provider, alone in this process
        with torch.inference_mode():
            return {"provider": provider, "tokens": tokens, "peak_extra_mb": peak_extra_mb(providers[provider])}
    with torch.inference_mode():
        timed = round_robin(providers, repeats)
    return {"tokens": tokens, "threads": threads, "providers": timed}


def _gemma_ids(tokens: int):
    from attnpatch.eval import load_task
    from attnpatch.models import load

    model, tok = load("gemma-3-270m")
    text = "\n\n".join(item.context for item in load_task("boolq", limit=60))  # real passages
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] != tokens:
        raise SystemExit(f"the sample text has only {ids.shape[1]} tokens")
    return model, tok, ids


def model_forward(tokens: int, threads: int, repeats: int) -> dict:
    import attnpatch

    torch.set_num_threads(threads)
    model, _, ids = _gemma_ids(tokens)

    def forward():
        with torch.inference_mode():
            model(ids, logits_to_keep=1)

    def patched():
        with attnpatch.patched(model, "act"):
            forward()

    return {
        "tokens": tokens,
        "threads": threads,
        "providers": round_robin({"unpatched": forward, "act": patched}, repeats),
    }


def workloads(threads: int) -> dict:
    """Wall time of a fixed small calibration and a fixed evaluation slice (one run each)."""
    from attnpatch.calibrate.act import calibrate_act
    from attnpatch.eval.runner import evaluate
    from attnpatch.models import load

    torch.set_num_threads(threads)
    model, tok = load("gemma-3-270m")
    t0 = time.perf_counter()
    calibrate_act(model, tok, ["copa"], limit=16, candidates={4: "all", 8: "all"}, progress=False)
    calibration = time.perf_counter() - t0
    t0 = time.perf_counter()
    configs = {"unpatched": None, "act": {"method": "act"}}
    evaluate(model, tok, ["boolq"], configs=configs, limit=32, progress=False)
    return {"threads": threads, "calibration_s": calibration, "evaluation_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ driver


def _child(args: list[str], python_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{python_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=python_path)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_parts(opts: argparse.Namespace, root: Path, *, before: bool = False) -> dict:
    out: dict = {}
    reps = str(opts.repeats)
    if "layer" in opts.parts:
        threads = [1] if before else opts.threads
        out["layer"] = [_child(["layer", str(n), str(t), reps], root) for t in threads for n in opts.layer_tokens]
        if not before:
            names = layer_providers(8).keys() | {"act eager"}
            out["layer_memory"] = [
                _child(["layer", str(n), "1", "1", name], root)
                for n in opts.layer_tokens
                for name in sorted(names)
                if name != "act eager" or n <= EAGER_MAX_TOKENS
            ]
    if "model" in opts.parts and not before:
        out["model"] = [_child(["model", str(n), "2", reps], root) for n in opts.model_tokens]
    if "workloads" in opts.parts:
        out["workloads"] = _child(["workloads", "2"], root)
    return out


def ratios(results: dict) -> dict:
    """Each provider's median over SDPA's (layer) or the unpatched model's (model), per (tokens, threads)."""
    table = {}
    for entry in results.get("layer", []):
        base = entry["providers"]["sdpa"]["median_ms"]
        key = f"layer {entry['tokens']} tokens, {entry['threads']} thread(s)"
        table[key] = {n: p["median_ms"] / base for n, p in entry["providers"].items() if n != "sdpa"}
    for entry in results.get("model", []):
        p = entry["providers"]
        table[f"gemma-3-270m {entry['tokens']} tokens"] = {"act": p["act"]["median_ms"] / p["unpatched"]["median_ms"]}
    return table


LAYER_COLUMNS = ("sdpa", "attention+lse", "act", "var", "act eager")


def _cell(providers: dict, name: str, memory: float | None) -> str:
    """'ms (ratio to SDPA), +MB' of one provider in one layer entry."""
    if name not in providers:
        return "—"
    ms = providers[name]["median_ms"]
    ratio = ms / providers["sdpa"]["median_ms"]
    return f"{ms:.0f} ms ({ratio:.2f}×)" + (f", +{memory:.0f} MB" if memory is not None else "")


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device']}; torch {results['versions']['torch']}.", ""]
    memory = {(m["tokens"], m["provider"]): m["peak_extra_mb"] for m in results.get("layer_memory", [])}
    before = {e["tokens"]: e["providers"] for e in results.get("before", {}).get("layer", [])}
    lines += [
        "| tokens | threads | SDPA | attention + LSE | ACT | VAR | ACT eager (authors) | ACT before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results.get("layer", []):
        n, t, p = entry["tokens"], entry["threads"], entry["providers"]
        cells = [_cell(p, name, memory.get((n, name)) if t == 1 else None) for name in LAYER_COLUMNS]
        old = before.get(n, {}).get("act") if t == 1 else None
        cells.append(f"{old['median_ms']:.0f} ms" if old else "—")
        lines.append(f"| {n} | {t} | " + " | ".join(cells) + " |")
    if results.get("model"):
        lines += [
            "",
            "| Gemma-3 270M forward (last-token logits, 2 threads) | unpatched | ACT | ratio |",
            "|---|---|---|---|",
        ]
        for entry in results["model"]:
            u, a = (entry["providers"][k]["median_ms"] for k in ("unpatched", "act"))
            lines.append(f"| {entry['tokens']} tokens | {u:.0f} ms | {a:.0f} ms | {a / u:.2f}× |")
    if results.get("workloads"):
        w, old = results["workloads"], results.get("before", {}).get("workloads")
        lines += ["", "| wall time (2 threads) | this revision | before |", "|---|---|---|"]
        for key, label in (
            ("calibration_s", "calibrate_act, 16 COPA items, 2 layers"),
            ("evaluation_s", "evaluate, 32 BoolQ items, unpatched + ACT"),
        ):
            lines.append(f"| {label} | {w[key]:.1f} s | {f'{old[key]:.1f} s' if old else '—'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for threads in sorted({e["threads"] for e in results["layer"]}):
        entries = [e for e in results["layer"] if e["threads"] == threads]
        tokens = [e["tokens"] for e in entries]
        for name, style in (("attention+lse", ":"), ("act", "-"), ("var", "--"), ("act eager", "-.")):
            points = [
                (n, e["providers"][name]["median_ms"] / e["providers"]["sdpa"]["median_ms"])
                for n, e in zip(tokens, entries, strict=True)
                if name in e["providers"]
            ]
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{name}, {threads} thread(s)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("time / SDPA (same run)")
    ax.set_title("One Gemma-shaped layer on CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parts", nargs="+", default=["layer", "model", "workloads"], choices=["layer", "model", "workloads"]
    )
    parser.add_argument("--layer-tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model-tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default=None, help="a git revision to measure in the same run (layer, workloads)")
    parser.add_argument("--out", default="benchmarks/results/act_cpu.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "layer":
            tokens, threads, repeats, *provider = rest
            result = layer(int(tokens), int(threads), int(repeats), provider[0] if provider else None)
        elif kind == "model":
            result = model_forward(*map(int, rest))
        else:
            result = workloads(int(rest[0]))
        print(json.dumps(result))
        return

    import transformers

    results = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        **run_parts(args, ROOT),
    }
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "before"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before],
                check=True,
                capture_output=True,
            )
            try:
                results["before"] = {"revision": args.before, **run_parts(args, tree, before=True)}
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    results["ratios"] = ratios(results)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    Path(args.out).with_suffix(".md").write_text(table)
    if results.get("layer"):
        plot(results, str(Path(args.out).with_suffix(".png")))
    print(table)


if __name__ == "__main__":
    main()
