"""End-to-end `generate()` latency of a random-weight ~1.1B Llama in bf16: unpatched (SDPA), ACT through attnpatch
(its default heads: every head of layers 2..L-2), ACT through attnpatch's PyTorch path, and ACT done eagerly like
the authors' code (materialised [B, H, L, L] probabilities) on the same heads.

    python benchmarks/bench_generate.py [--prompt-lengths 512 2048 8192] [--new-tokens 32] [--repeats 5]
                                        [--out-dir benchmarks/results] [--smoke]

The model is TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 query / 4 kv heads of dim 64, MLP 5632, vocab 32000,
rope theta 5e5) with random weights and two planted attention sinks (`tests/helpers/tiny_models.planted_llama`):
the prompt's first token and a token in its middle take most of every row's attention, as a trained model's sinks
do, so ACT finds a hidden sink in every calibrated head and runs its correction. Greedy decoding, batch 1, DynamicCache.

prefill = median time of `generate(max_new_tokens=1)`; decode = (median time of `generate(max_new_tokens=1 + n)` -
prefill) / n, per token; `peak_extra_mb`: the allocator's high-water mark during the longer call above what was
allocated before it (the weights do not count). Times come from CUDA events around whole calls after warm-up.
Before timing, each ACT variant's prompt logits are compared with attnpatch's ACT (and the unpatched model's),
and its sinks with attnpatch's: the eager variant must compute the same thing.

`--smoke` runs a 6-layer, hidden-256 model in fp32 on short prompts, on CPU too (wall-clock timing): a check of
this script, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "helpers")]

from common import (  # noqa: E402
    add_run_options,
    call_ms,
    cleanup,
    describe_path,
    eager_act,
    error_text,
    record_failure,
    report_stem,
    run_config,
    run_setup,
    timing_note,
    write_report,
)

import attnpatch  # noqa: E402
from attnpatch.kernels.backend import ENV_VAR  # noqa: E402
from attnpatch.methods.act import ACT, ACTConfig  # noqa: E402
from attnpatch.methods.base import AttentionCall, register_method  # noqa: E402

from tiny_models import SINK, SINK_2, planted_llama  # noqa: E402

MODEL = dict(layers=22, hidden=2048, heads=32, kv_heads=4, intermediate=5632, rope_theta=500000.0)
SMOKE_MODEL = dict(layers=6, hidden=256, heads=4, kv_heads=2, intermediate=512, rope_theta=500000.0)
VARIANTS = ("unpatched", "act", "act_torch_path", "act_eager")


@register_method
class EagerACT(ACT):
    """ACT with the authors' eager computation (`common.eager_act`) on the same heads and running statistic:
    a benchmark-only method, for batch-1 prompts without padding."""

    name = "act_eager_benchmark"
    config_class = ACTConfig

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        heads = self._head_index.get(call.layer)
        if heads is None:
            return None
        cfg = self.config
        if call.query.shape[0] != 1 or cfg.min_visible_rows != 1 or not cfg.keep_first_sink or call.sliding_window:
            raise NotImplementedError("the eager benchmark ACT takes batch 1, no sliding window, the default rules")
        q, k = call.query, call.key
        hq, hkv = q.shape[1], k.shape[1]
        dev_heads = heads.to(q.device)
        out, sinks, stats = eager_act(
            q[:, dev_heads], k, call.value, scale=call.scale, beta=cfg.beta, threshold=cfg.threshold, causal=True,
            kv_head_index=heads // (hq // hkv), history=self._history_for(call), return_stats=True,
        )  # fmt: skip
        self.remember(call, stats, sinks)
        if len(heads) == hq:
            return out.transpose(1, 2).contiguous(), None
        full = call.base()[0].clone()
        full[:, :, dev_heads] = out.transpose(1, 2)
        return full, None


def prompt(length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[1, length] random token ids with the model's sink tokens first and in the middle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 32000, (1, length), generator=g)
    ids[0, 0], ids[0, length // 2] = SINK, SINK_2
    return ids.to(device)


def apply_variant(model, variant: str) -> attnpatch.Patch | None:
    """Patch `model` for `variant` (None for the unpatched model); the PyTorch-path variant sets ATTNPATCH_BACKEND,
    which the caller clears after the patch is removed."""
    os.environ.pop(ENV_VAR, None)
    if variant == "unpatched":
        return None
    if variant == "act":
        return attnpatch.apply(model, "act")
    if variant == "act_torch_path":
        os.environ[ENV_VAR] = "torch"
        return attnpatch.apply(model, "act")
    if variant == "act_eager":
        return attnpatch.apply(model, EagerACT.name)
    raise ValueError(variant)


def generate_fn(model, ids: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0, cache_implementation="dynamic",
            )  # fmt: skip

    return run


def prompt_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0].float()


def check_variants(model, ids: torch.Tensor) -> dict:
    """Prompt logits and sinks of every ACT variant against attnpatch's ACT, and how far ACT moves the logits."""
    base = prompt_logits(model, ids)
    logits, sinks = {}, {}
    for variant in VARIANTS[1:]:
        patch = apply_variant(model, variant)
        try:
            logits[variant] = prompt_logits(model, ids)
            sinks[variant] = {layer: s.clone() for layer, s in patch.method.last_sinks.items()}
        finally:
            patch.remove()
            os.environ.pop(ENV_VAR, None)
    ref, ref_sinks = logits["act"], sinks["act"]
    middle = ids.shape[1] // 2
    report = {
        "act_vs_unpatched_max_abs": (ref - base).abs().max().item(),
        "act_hidden_sink_found_in_layers": sum(bool(s[0, :, middle].all()) for s in ref_sinks.values()),
        "act_layers": len(ref_sinks),
        "act_sinks_per_head": statistics.mean(s.sum(-1).float().mean().item() for s in ref_sinks.values()),
    }
    for variant in VARIANTS[2:]:
        report[f"{variant}_vs_act_max_abs"] = (logits[variant] - ref).abs().max().item()
        report[f"{variant}_sinks_equal_act"] = all(torch.equal(sinks[variant][n], s) for n, s in ref_sinks.items())
    return report


def measure(model, ids: torch.Tensor, variant: str, *, new_tokens: int, cuda: bool, warmup: int, repeats: int) -> dict:
    """Prefill and per-token decode latency and peak extra memory of one variant on one prompt."""
    row: dict = {"variant": variant, "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "status": "ok"}
    patch = None
    try:
        patch = apply_variant(model, variant)
        first = call_ms(generate_fn(model, ids, 1), cuda, warmup, repeats)
        full_fn = generate_fn(model, ids, 1 + new_tokens)
        full = call_ms(full_fn, cuda, warmup, repeats)
        prefill, total = statistics.median(first), statistics.median(full)
        row.update(prefill_ms=prefill, generate_ms=total, decode_ms_per_token=(total - prefill) / new_tokens)
        row.update(prefill_times_ms=first, generate_times_ms=full)
        if cuda:
            cleanup(cuda)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            full_fn()
            torch.cuda.synchronize()
            row["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    except Exception as e:  # one variant's failure (out of memory, say) must not end the run
        record_failure(row, e)
    finally:
        if patch is not None:
            patch.remove()
        os.environ.pop(ENV_VAR, None)
        cleanup(cuda)
    shown = (
        f"prefill {row['prefill_ms']:9.2f} ms, decode {row['decode_ms_per_token']:7.3f} ms/token"
        if row["status"] == "ok"
        else row["error"]
    )
    mem = f", peak +{row['peak_extra_mb']:8.1f} MiB" if "peak_extra_mb" in row else ""
    print(f"L={ids.shape[1]:>6} {variant:>15}: {shown}{mem}", flush=True)
    return row


def add_ratios(rows: list[dict]) -> None:
    """prefill/decode ratios of each variant to the unpatched model on the same prompt length."""
    for r in rows:
        base = next((b for b in rows if b["variant"] == "unpatched" and b["prompt_tokens"] == r["prompt_tokens"]), None)
        if base is None or base["status"] != "ok" or r["status"] != "ok":
            continue
        r["prefill_vs_unpatched"] = r["prefill_ms"] / base["prefill_ms"]
        r["decode_vs_unpatched"] = r["decode_ms_per_token"] / base["decode_ms_per_token"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lengths", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per timed generate")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    add_run_options(parser, smoke_repeats=2)
    args = parser.parse_args()
    cuda, device, repeats, warmup = run_setup(parser, args, smoke_repeats=2)
    if args.repeats is None and not args.smoke:
        repeats = 5  # whole generate() calls: long enough that 5 give a stable median
    shape = SMOKE_MODEL if args.smoke else MODEL
    dtype = torch.float32 if args.smoke else torch.bfloat16
    lengths = [48, 96] if args.smoke else args.prompt_lengths
    new_tokens = 4 if args.smoke else args.new_tokens

    name, compute_path = describe_path(device)
    model = planted_llama(dtype, device=device, positions=max(lengths) + new_tokens + 1, **shape)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.3f}B parameters, {dtype}", flush=True)

    checks = {}
    try:
        checks = check_variants(model, prompt(lengths[0], device))
    except Exception as e:
        checks = {"error": error_text(e)}
    print("sanity:", checks, flush=True)

    config = run_config(
        cuda, repeats, warmup, args.smoke,
        timing=timing_note(cuda).replace("L2 flushed before each run", "whole generate() calls"),
        model=dict(shape, parameters=params, dtype=str(dtype).removeprefix("torch."), sinks="planted: first, middle"),
        act="attnpatch defaults (beta 0.4, threshold 0.1, every head of layers 2..L-2)", new_tokens=new_tokens,
        decoding="greedy, batch 1, DynamicCache",
    )  # fmt: skip
    stem = report_stem("generate", name, args.smoke)
    rows = []
    for n in lengths:
        ids = prompt(n, device)
        for variant in args.variants:
            rows.append(measure(model, ids, variant, new_tokens=new_tokens, cuda=cuda, warmup=warmup, repeats=repeats))
        add_ratios(rows)
        write_report(args.out_dir, stem, name, compute_path, config, checks, rows, quiet=True)
    write_report(args.out_dir, stem, name, compute_path, config, checks, rows)


if __name__ == "__main__":
    main()
