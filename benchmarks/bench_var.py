"""VAR attention cost on one GPU: our fused VAR kernel vs SDPA (flash backend), FlexAttention and VAR done eagerly
like the authors' code (materialised probabilities).

    python benchmarks/bench_var.py [--lengths 2048 4096 8192] [--decode-lengths ...] [--repeats 30] [--smoke]

Shapes: B=1, 32 query heads sharing 8 kv heads, head dim 128, bf16; causal prefill (Lq = Lk = L) and decode (one query
against Lk keys), a LLaVA-1.5 layout: 576 image tokens starting at position 35, text sink at key 0, visual sinks at
three image positions (the inputs of bench_attention.py give key 0 and two hidden sinks large logits). Timing, memory
and output format as bench_attention.py (CUDA events, L2 flushed, median; `peak_extra_mb` above the inputs). The
target of the VAR issue: VAR <= 1.15x SDPA time with O(L) extra memory. `--smoke` runs tiny fp32 shapes on CPU too
(image span scaled down): a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json

import bench_attention as ba
import torch

VAR = dict(keep_fraction=0.6, rho=0.5, summ=0.2)
IMAGE_START, IMAGE_TOKENS = 35, 576


def layout(shape: ba.Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sinks, image [B, Lk] and rows [B, Lq] (text after the image) for a LLaVA-style prompt of Lk tokens."""
    lk = shape.lk
    start, count = (IMAGE_START, IMAGE_TOKENS) if lk > IMAGE_START + IMAGE_TOKENS + 1 else (lk // 8, lk // 2)
    image = torch.zeros(shape.b, lk, dtype=torch.bool, device=device)
    image[:, start : start + count] = True
    sinks = torch.zeros_like(image)
    sinks[:, 0] = True
    for p in (start + 1, start + count // 2, start + count - 3):
        sinks[:, p] = True
    position = torch.arange(lk - shape.lq, lk, device=device)
    rows = (position >= start + count).expand(shape.b, shape.lq).contiguous()
    return sinks, image, rows


def eager_var(q, k, v, *, scale, sinks, image, rows, causal, keep_fraction, rho, summ):
    """VAR the way the authors' code does it (our compact re-expression, not their code): K/V repeated per query head,
    [B, H, Lq, Lk] probabilities materialised in the input dtype (softmax in float32), image and sink masses per row,
    the paper's image-centric test, sinks scaled by keep_fraction and the freed mass given to non-sink image keys."""
    lq, lk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = (q @ k.transpose(-1, -2)) * scale
    if causal:
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    del logits
    snk, img = sinks[:, None, None, :], image[:, None, None, :]
    ins = img & ~snk
    image_mass = (probs * img).sum(-1, dtype=torch.float32)
    w = (probs * ins).sum(-1, dtype=torch.float32)
    chosen = rows[:, None, :] & (w >= rho * image_mass) & (image_mass >= summ) & (w > 0)
    chosen &= (sinks & image).any(-1)[:, None, None]
    gain = (1 - keep_fraction) * (probs * snk).sum(-1, dtype=torch.float32) / w.clamp_min(1e-30)
    weight = torch.where(snk, keep_fraction, torch.where(ins, 1.0 + gain[..., None], 1.0))
    probs = torch.where(chosen[..., None], probs * weight.to(q.dtype), probs)
    return probs @ v, chosen


def build_providers(shape: ba.Shape, q, k, v, *, cuda: bool):
    """(name, factory) pairs: SDPA (and FlexAttention on CUDA) for the plain attention, our VAR, the eager VAR."""
    from attnpatch.kernels.var import var_attention

    scale = shape.d**-0.5
    sinks, image, rows = layout(shape, q.device)
    plain = [p for p in ba.build_providers(shape, q, k, v, cuda=cuda) if p[0] in ("sdpa", "sdpa_flash", "flex")]

    def ours() -> ba.Provider:
        def run():
            return var_attention(
                q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, **VAR
            ).out

        return ba.Provider("attnpatch_var", run, note="fused key-class pass")

    def eager() -> ba.Provider:
        def run():
            return eager_var(q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, **VAR)[0]

        return ba.Provider("eager_var", run, note="materialised probabilities in the input dtype")

    def unsplit() -> ba.Provider:
        p = ours()
        note = "one program per query head, no key split"
        return ba.Provider("attnpatch_var_unsplit", p.fn, previous_var_decode, note)

    decode = [("attnpatch_var_unsplit", unsplit)] if shape.mode == "decode" else []
    return [*plain, ("attnpatch_var", ours), ("eager_var", eager), *decode]


def previous_var_decode():
    """VAR decode as it ran before the key split and the query-head folding (switches off), measured beside it."""
    from attnpatch.kernels._triton import flash
    from attnpatch.kernels._triton import var as var_kernel

    return ba.switched_off((flash, "FOLD_DECODE_GROUPS"), (var_kernel, "SPLIT_KEYS"))


def sanity(shape: ba.Shape, device: torch.device) -> dict:
    """Our VAR vs the eager VAR: max abs difference, selections compared, how far VAR moved the output."""
    from attnpatch.kernels.attention import attention
    from attnpatch.kernels.var import var_attention

    q, k, v = ba.make_inputs(shape, device)
    scale = shape.d**-0.5
    sinks, image, rows = layout(shape, device)
    report: dict = {"shape": vars(shape) if hasattr(shape, "__dict__") else str(shape)}
    try:
        ours = var_attention(
            q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, return_selected=True, **VAR
        )
        eager, chosen = eager_var(q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, **VAR)
        plain = attention(q, k, v, scale=scale, causal=shape.causal)
        report.update(
            max_abs_err_vs_eager=(ours.out.double() - eager.double()).abs().max().item(),
            selected=int(ours.selected.sum()),
            selected_eager=int(chosen.sum()),
            selection_agreement=(ours.selected == chosen).float().mean().item(),
            var_changes_output_by=(ours.out.double() - plain.double()).abs().max().item(),
        )
    except Exception as e:
        report["error"] = "oom" if ba._is_oom(e) else ba._error(e)
    ba._cleanup(device.type == "cuda")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[2048, 8192])
    ba.add_run_options(parser, smoke_repeats=3)
    args = parser.parse_args()
    cuda, device, repeats, warmup = ba.run_setup(parser, args, smoke_repeats=3)
    if args.smoke:
        dims = dict(b=1, hq=4, hkv=2, d=32, dtype="float32")
        lengths, decode_lengths = [64, 128], [128]
    else:
        dims = dict(b=1, hq=32, hkv=8, d=128, dtype="bfloat16")
        lengths, decode_lengths = args.lengths, args.decode_lengths
    shapes = [ba.Shape("prefill", lq=n, lk=n, **dims) for n in lengths]
    shapes += [ba.Shape("decode", lq=1, lk=n, **dims) for n in decode_lengths]

    name, compute_path = ba.describe_path(device)
    checks = [sanity(shapes[0], device), sanity(shapes[-1], device)]
    for check in checks:
        print("sanity:", json.dumps(check), flush=True)
    timer = ba.Timer(cuda, warmup, repeats)
    stem = f"var_{ba.slug(name)}" + ("_smoke" if args.smoke else "")
    config = dict(
        dims,
        var=VAR,
        image=f"{IMAGE_TOKENS} tokens from {IMAGE_START}",
        causal_prefill=True,
        repeats=repeats,
        warmup=warmup,
        timing=ba.timing_note(cuda),
        smoke=args.smoke,
    )  # fmt: skip
    results = []
    for shape in shapes:
        results += ba.measure_shape(shape, device, timer, None, build=build_providers)
        ba.write_report(args.out_dir, stem, name, compute_path, config, checks, results, quiet=True)
    json_path = ba.write_report(args.out_dir, stem, name, compute_path, config, checks, results)
    try:
        ba.plot(results, json_path.with_suffix(".png"), f"VAR on {name}; {dims}")
    except Exception as e:
        print(f"plot failed: {ba._error(e)}")


if __name__ == "__main__":
    main()
