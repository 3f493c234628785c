"""VAR sink dimensions of the real zoo models: which hidden dims mark sink tokens, and how well tau separates them.

    OMP_NUM_THREADS=1 python benchmarks/var_sink_dims.py [--models gemma-3-270m qwen2.5-0.5b-instruct] [--tau 20]

Per model: `discover_sink_dims` on the built-in prompts at the default tau (timed), a sweep over tau (the statistic
|x[d]| / RMS(x) is at most sqrt(hidden_size), so tau = 20 means different things for different widths), and a
per-layer look at the first token (its strongest dimension, the other tokens' ratio on that dimension, its norm
over the median token's norm). The profile is saved under benchmarks/results/profiles/<model>-var/ when the default
tau finds sink dims. Results: benchmarks/results/var_sink_dims.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import torch

import attnpatch
from attnpatch.calibrate.var import DEFAULT_TEXTS, _prompts, calibrate_var, discover_sink_dims, layer_input_ratios
from attnpatch.models import is_installed, load

MODELS = ["gemma-3-270m", "qwen2.5-0.5b-instruct"]
SWEEP = [5.0, 10.0, 15.0, 20.0, 24.0, 25.0]
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def first_token_layers(model, tokenizer, report) -> list[dict[str, Any]]:
    """Per layer >= min_layer: the first token's strongest dim (most common over the prompts), its median ratio
    there, the other tokens' median / p99 / max ratio on that dim, and the first token's norm ratio."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for prompt in _prompts(tokenizer, None):
        for layer, r in layer_input_ratios(model, prompt.ids, min_layer=report.min_layer).items():
            per_layer.setdefault(layer, []).append(r)
    rows = []
    for i, (layer, ratios) in enumerate(sorted(per_layer.items())):
        dim = int(torch.stack([r[0].argmax() for r in ratios]).mode().values)
        ordinary = torch.cat([r[1:, dim] for r in ratios]).double()
        rows.append(
            dict(
                layer=layer,
                dim=dim,
                first=float(torch.stack([r[0, dim] for r in ratios]).median()),
                others_median=float(ordinary.median()),
                others_p99=float(torch.quantile(ordinary, 0.99)),
                others_max=float(ordinary.max()),
                first_norm_ratio=report.first_token_norm_ratio[i],
            )
        )
    return rows


def sweep(model, tokenizer, taus: list[float]) -> list[dict[str, Any]]:
    out = []
    for tau in taus:
        r = discover_sink_dims(model, tokenizer, tau=tau)
        out.append(
            dict(
                tau=tau,
                dims=r.dims,
                separation={s.dim: s.separation for s in r.dim_stats},
                sink_tokens=len(r.sink_tokens),
                prompts_with_sinks=r.prompts_with_sinks,
                phi=r.phi,
                suggested_tau=r.suggested_tau,
                dense_dims=[d["dim"] for d in r.dense_dims],
                dropped={d["dim"]: d["separation"] for d in r.dropped},
                warnings=r.warnings,
            )
        )
    return out


def run_model(name: str, tau: float, taus: list[float]) -> dict[str, Any]:
    started = time.perf_counter()
    model, tok = load(name)
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - started}
    report = discover_sink_dims(model, tok, tau=tau)
    result.update(report=report.to_dict(), profile=None, error=None)
    print(f"{name}: {report.summary()}  ({report.seconds:.1f} s)", flush=True)
    try:
        profile = calibrate_var(model, tok, tau=tau)
        saved = profile.save(os.path.join(RESULTS, "profiles", f"{name}-var"))
        result["profile"] = os.path.relpath(saved, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except ValueError as e:
        result["error"] = str(e)
    result["first_token_layers"] = first_token_layers(model, tok, report)
    result["sweep"] = sweep(model, tok, taus)
    return result


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def model_markdown(name: str, res: dict[str, Any]) -> list[str]:
    r = res["report"]
    lines = [
        f"## {name}",
        "",
        f"hidden {r['hidden_size']} (largest possible ratio sqrt(hidden) = {r['max_possible_ratio']:.2f}), "
        f"{r['num_layers']} layers, layers measured {r['min_layer']}..{r['num_layers'] - 1}, {r['prompts']} prompts "
        f"({r['tokens']} tokens); discovery {r['seconds']:.1f} s; tau {r['tau']:g}.",
        "",
        f"**Sink dims: {r['dims'] or 'none'}**" + (f"; suggested tau {_f(r['suggested_tau'])}" if r["dims"] else ""),
        "",
    ]
    if r["dim_stats"]:
        lines += [
            "| dim | layers | sink median | ordinary median | ordinary p99 | ordinary max | separation | tokens |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in r["dim_stats"]:
            tokens = ", ".join(f"`{t}` x{n}" for t, n in list(s["tokens"].items())[:8])
            lines.append(
                f"| {s['dim']} | {s['layers'][0]}-{s['layers'][-1]} | {s['sink_median']:.2f} | "
                f"{_f(s['ordinary_median'])} | {_f(s['ordinary_p99'])} | {_f(s['ordinary_max'])} | "
                f"{_f(s['separation'])} | {tokens} |"
            )
        lines += ["", "phi (max over the sink dims): " + ", ".join(f"{k} {_f(v, 3)}" for k, v in r["phi"].items())]
    if res["error"]:
        lines += ["", f"calibrate: `ValueError: {res['error']}`"]
    lines += ["", "Warnings:" if r["warnings"] else "No warnings."] + [f"- {w}" for w in r["warnings"]]
    lines += [
        "",
        "First token per layer: its strongest dim, its ratio there vs the other tokens' (secondary sinks included),",
        "its norm over the median token norm (medians over the prompts):",
        "",
        "| layer | dim | first | others median | others p99 | others max | norm ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["first_token_layers"]:
        lines.append(
            f"| {row['layer']} | {row['dim']} | {row['first']:.2f} | {row['others_median']:.2f} | "
            f"{row['others_p99']:.2f} | {row['others_max']:.2f} | {row['first_norm_ratio']:.1f} |"
        )
    lines += [
        "",
        "Tau sweep (the sink tokens depend on tau: a token is a sink when massive at >= half of the layers; "
        "dims with separation < 1.5 are dropped):",
        "",
        "| tau | dims (separation) | dropped (separation) | sink tokens | phi ordinary max | phi sink median | "
        "suggested tau | dense dims |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in res["sweep"]:
        dims = ", ".join(f"{d} ({_f(v)})" for d, v in s["separation"].items()) or "none"
        dropped = ", ".join(f"{d} ({_f(v)})" for d, v in s["dropped"].items()) or "—"
        lines.append(
            f"| {s['tau']:g} | {dims} | {dropped} | {s['sink_tokens']} in {s['prompts_with_sinks']} prompts | "
            f"{_f(s['phi'].get('ordinary_max'))} | {_f(s['phi'].get('sink_median'))} | {_f(s['suggested_tau'])} | "
            f"{s['dense_dims']} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tau", type=float, default=20.0)
    parser.add_argument("--sweep", nargs="*", type=float, default=SWEEP)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data: dict[str, Any] = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "attnpatch": attnpatch.__version__},
        "prompts": list(DEFAULT_TEXTS),
        "models": {},
    }
    for name in args.models:
        if not is_installed(name):
            print(f"{name}: not installed, skipped")
            continue
        data["models"][name] = run_model(name, args.tau, args.sweep)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "var_sink_dims.json"), "w") as f:
        json.dump(data, f, indent=1)
    lines = ["# VAR sink dimensions of the zoo models", "", f"Device: {data['device']}; defaults prompts "
             f"(`attnpatch.calibrate.var.DEFAULT_TEXTS`); generated by `benchmarks/var_sink_dims.py`.", ""]  # fmt: skip
    for name, res in data["models"].items():
        lines += model_markdown(name, res)
    with open(os.path.join(RESULTS, "var_sink_dims.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
