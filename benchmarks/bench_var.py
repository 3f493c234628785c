"""VAR attention cost on one GPU: our fused VAR kernel vs SDPA (flash backend), FlexAttention and VAR done eagerly
like the authors' code (materialised probabilities).

    python benchmarks/bench_var.py [--lengths 2048 4096 8192] [--decode-lengths ...] [--repeats 30] [--smoke]

Shapes: B=1, 32 query heads sharing 8 kv heads, head dim 128, bf16; causal prefill (Lq = Lk = L) and decode (one query
against Lk keys), a LLaVA-1.5 layout: 576 image tokens starting at position 35, text sink at key 0, visual sinks at
three image positions (the attention inputs of common.py give key 0 and two hidden sinks large logits). Timing, memory
and output format as bench_attention.py (CUDA events, L2 flushed, median; `peak_extra_mb` above the inputs). The
target of the VAR issue: VAR <= 1.15x SDPA time with O(L) extra memory. `--smoke` runs tiny fp32 shapes on CPU too
(image span scaled down): a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import (
    Provider,
    Shape,
    Timer,
    add_run_options,
    attention_shapes,
    describe_path,
    make_inputs,
    measure_shape,
    plain_providers,
    report_stem,
    run_check,
    run_config,
    run_setup,
    write_plot,
    write_report,
)

VAR = dict(keep_fraction=0.6, rho=0.5, summ=0.2)
IMAGE_START, IMAGE_TOKENS = 35, 576


def layout(shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def build_providers(shape: Shape, q, k, v, *, cuda: bool):
    """(name, factory) pairs: SDPA (and FlexAttention on CUDA) for the plain attention, our VAR, the eager VAR."""
    from attnpatch.kernels.var import var_attention

    scale = shape.d**-0.5
    sinks, image, rows = layout(shape, q.device)
    plain = plain_providers(shape, q, k, v, cuda=cuda)

    def ours() -> Provider:
        def run():
            return var_attention(
                q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, **VAR
            ).out

        return Provider("attnpatch_var", run, note="fused key-class pass")

    def eager() -> Provider:
        def run():
            return eager_var(q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, **VAR)[0]

        return Provider("eager_var", run, note="materialised probabilities in the input dtype")

    def unsplit() -> Provider:
        p = ours()
        note = "one program per query head, no key split"
        return Provider("attnpatch_var_unsplit", p.fn, previous_var_decode, note)

    decode = [("attnpatch_var_unsplit", unsplit)] if shape.mode == "decode" else []
    return [*plain, ("attnpatch_var", ours), ("eager_var", eager), *decode]


def previous_var_decode():
    """VAR decode as it ran before the key split and the query-head folding (`KernelOptions.split_keys` and
    `fold_decode_groups` off), measured beside it."""
    from attnpatch.kernels import kernel_options

    return kernel_options(fold_decode_groups=False, split_keys=False)


def sanity(shape: Shape, device: torch.device) -> dict:
    """Our VAR vs the eager VAR: max abs difference, selections compared, how far VAR moved the output."""
    from attnpatch.kernels.attention import attention
    from attnpatch.kernels.var import var_attention

    q, k, v = make_inputs(shape, device)
    scale = shape.d**-0.5
    sinks, image, rows = layout(shape, device)
    report: dict = {"shape": vars(shape) if hasattr(shape, "__dict__") else str(shape)}

    def check() -> dict:
        ours = var_attention(
            q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, return_selected=True, **VAR
        )
        eager, chosen = eager_var(q, k, v, scale=scale, sinks=sinks, image=image, rows=rows, causal=shape.causal, **VAR)
        plain = attention(q, k, v, scale=scale, causal=shape.causal)
        return dict(
            max_abs_err_vs_eager=(ours.out.double() - eager.double()).abs().max().item(),
            selected=int(ours.selected.sum()),
            selected_eager=int(chosen.sum()),
            selection_agreement=(ours.selected == chosen).float().mean().item(),
            var_changes_output_by=(ours.out.double() - plain.double()).abs().max().item(),
        )

    run_check(report, check, cuda=device.type == "cuda")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[2048, 8192])
    add_run_options(parser, smoke_repeats=3)
    args = parser.parse_args()
    cuda, device, repeats, warmup = run_setup(parser, args, smoke_repeats=3)
    dims, shapes = attention_shapes(args, smoke_decode_lengths=[128])

    name, compute_path = describe_path(device)
    checks = [sanity(shapes[0], device), sanity(shapes[-1], device)]
    for check in checks:
        print("sanity:", json.dumps(check), flush=True)
    timer = Timer(cuda, warmup, repeats)
    stem = report_stem("var", name, args.smoke)
    config = run_config(
        cuda, repeats, warmup, args.smoke, **dims, var=VAR, image=f"{IMAGE_TOKENS} tokens from {IMAGE_START}",
        causal_prefill=True,
    )  # fmt: skip
    results = []
    for shape in shapes:
        results += measure_shape(shape, device, timer, None, build_providers)
        write_report(args.out_dir, stem, name, compute_path, config, checks, results, quiet=True)
    json_path = write_report(args.out_dir, stem, name, compute_path, config, checks, results)
    write_plot(results, json_path, f"VAR on {name}; {dims}")


if __name__ == "__main__":
    main()
