"""`attnpatch demo`: hidden sinks in Gemma-3 270M, ACT applied, an A/B on a real task, before/after attention maps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .analysis import find_sinks
from .api import patched

SAMPLE_PROMPT = (
    "Question: Which gas do green plants take in from the air to make their food?\n"
    "Answer: Plants take in carbon dioxide and give off oxygen."
)


def _tokens(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([int(i)]).replace("\n", "\\n") for i in ids]


DEFAULT_SHOTS = {"sst2": 4}
COMPARED_MIN_ROWS = 16  # the other setting of benchmarks/results/act_ablation.json (better on ARC, worse on SST-2)
MIN_ROWS_SHOWN = 5  # keys seen by fewer query rows pass the threshold on a handful of rows (end of the prompt)


def print_sinks(model, tokenizer, prompt: str, *, threshold: float, layers: set[int], limit: int = 12) -> list:
    """Print the hidden sinks (not the first sink) of `prompt` in `layers`; return all reports."""
    enc = tokenizer(prompt, return_tensors="pt")
    reports = find_sinks(model, enc.input_ids, enc.attention_mask, threshold=threshold)
    tokens = _tokens(tokenizer, enc.input_ids[0])
    every_hidden = [r for r in reports if not r.first and r.layer in layers]
    hidden = sorted((r for r in every_hidden if r.rows >= MIN_ROWS_SHOWN), key=lambda r: -r.column_mean)
    tail = len(every_hidden) - len(hidden)
    first_positions = sorted({r.position for r in reports if r.first})
    print(
        f"prompt: {len(tokens)} tokens; first sinks (kept by ACT) at positions {first_positions} "
        f"({', '.join(repr(tokens[p]) for p in first_positions)})"
    )
    print(
        f"hidden sinks (column mean > {threshold}) in layers {min(layers)}..{max(layers)}: {len(every_hidden)} "
        f"(layer, head, key) triples. {tail} of them are keys near the end of the prompt that fewer than "
        f"{MIN_ROWS_SHOWN} query rows see (the statistic is noisy there: see min_visible_rows); "
        f"the top {min(limit, len(hidden))} of the others:"
    )
    print(f"  {'layer':>5} {'head':>4} {'pos':>4} {'token':<14} {'col.mean':>8} {'rows':>5}")
    for r in hidden[:limit]:
        print(f"  {r.layer:>5} {r.head:>4} {r.position:>4} {tokens[r.position]!r:<14} {r.column_mean:8.3f} {r.rows:>5}")
    return reports


def save_attention_png(model, tokenizer, prompt: str, layer: int, head: int, path: Path, **act_options) -> None:
    """One head's attention map before and after calibration, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    enc = tokenizer(prompt, return_tensors="pt")
    maps = {}
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # every layer returns its maps; the patched head returns calibrated ones
    try:
        for label, beta in (("before", 1.0), ("after ACT", act_options.get("beta", 0.4))):
            options = {**act_options, "beta": beta, "heads": {layer: [head]}}
            with torch.inference_mode(), patched(model, "act", **options):
                out = model(**enc, output_attentions=True)
            maps[label] = out.attentions[layer][0, head].float().clamp_min(1e-4).numpy()
    finally:
        model.set_attn_implementation(implementation)
    tokens = _tokens(tokenizer, enc.input_ids[0])
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), constrained_layout=True)
    for ax, (label, attn) in zip(axes, maps.items(), strict=True):
        im = ax.imshow(attn, cmap="viridis", norm=LogNorm(vmin=1e-4, vmax=1.0))
        ax.set_title(f"layer {layer}, head {head}: {label}")
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention probability (log)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_demo(
    *,
    task: str = "sst2",
    limit: int = 200,
    shots: int | None = None,
    batch_size: int = 16,
    out_dir: str = "attnpatch-out",
    beta: float = 0.4,
    threshold: float = 0.1,
    cache_dir: str | None = None,
) -> dict:
    from .eval import load_task, paired_comparison, score_items
    from .models import load

    if shots is None:
        shots = DEFAULT_SHOTS.get(task, 0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load("gemma-3-270m", cache_dir=cache_dir)
    print(
        f"loaded gemma-3-270m in {time.perf_counter() - t0:.1f} s ({model.config.num_hidden_layers} layers, "
        f"{model.config.num_attention_heads} heads, {model.config.num_key_value_heads} kv head)"
    )
    num_layers = model.config.num_hidden_layers
    act_layers = set(range(2, num_layers - 1))

    print("\n== where are the hidden sinks? (ACT's column statistic on a sample prompt)")
    reports = print_sinks(model, tokenizer, SAMPLE_PROMPT, threshold=threshold, layers=act_layers)
    hidden = [r for r in reports if not r.first and r.layer in act_layers and r.rows >= MIN_ROWS_SHOWN]
    png = None
    if hidden:
        top = max(hidden, key=lambda r: r.column_mean)
        png = out / f"attention_layer{top.layer}_head{top.head}.png"
        save_attention_png(model, tokenizer, SAMPLE_PROMPT, top.layer, top.head, png, beta=beta, threshold=threshold)

    configs = {
        "ACT (authors' statistic)": {"beta": beta, "threshold": threshold},
        f"ACT min_visible_rows={COMPARED_MIN_ROWS}": {
            "beta": beta,
            "threshold": threshold,
            "min_visible_rows": COMPARED_MIN_ROWS,
        },
    }
    print(f"\n== A/B on {task} ({limit} items, {shots}-shot), ACT on every head of layers 2..{num_layers - 2}")
    items = load_task(task, shots=shots, limit=limit)
    labels = [it.label for it in items]

    def evaluate(options: dict | None) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        if options is None:
            preds = score_items(model, tokenizer, items, batch_size=batch_size, desc=f"unpatched · {task}")
        else:
            with patched(model, "act", **options):
                label = f"act {', '.join(f'{k}={v}' for k, v in options.items())} · {task}"
                preds = score_items(model, tokenizer, items, batch_size=batch_size, desc=label)
        return [int(p == y) for p, y in zip(preds, labels, strict=True)], time.perf_counter() - t0

    base_ok, base_s = evaluate(None)
    rows = {"unpatched": {"accuracy": sum(base_ok) / len(base_ok), "seconds": round(base_s, 1)}}
    for name, options in configs.items():
        ok, seconds = evaluate(options)
        rows[name] = {"options": options, "seconds": round(seconds, 1), **paired_comparison(base_ok, ok)}
    print(
        f"\n{'configuration':<32} {'accuracy':>8} {'vs unpatched':>13} {'95% CI':>15} {'McNemar p':>9} "
        f"{'fixed':>5} {'broken':>6} {'time':>6}"
    )
    print(
        f"{'unpatched':<32} {rows['unpatched']['accuracy']:8.3f} {'':>13} {'':>15} {'':>9} {'':>5} {'':>6} "
        f"{base_s:5.0f}s"
    )
    for name in configs:
        r = rows[name]
        lo, hi = r["diff_ci"]
        print(
            f"{name:<32} {r['acc_b']:8.3f} {r['diff']:+13.3f} {f'{lo:+.3f}..{hi:+.3f}':>15} "
            f"{r['p_mcnemar']:9.3f} {r['b_only']:5d} {r['a_only']:6d} {r['seconds']:5.0f}s"
        )
    summary = {
        "model": "gemma-3-270m",
        "task": task,
        "items": len(items),
        "shots": shots,
        "layers": f"2..{num_layers - 2}, every head",
        "results": rows,
        "hidden_sinks_on_sample": len(hidden),
        "png": str(png) if png else None,
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\nfiles: {out / 'demo_results.json'}" + (f", {png}" if png else ""))
    return summary
