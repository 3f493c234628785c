"""`attnpatch analyze`: head importance, distance profiles, pattern clusters (and sinks for text models) of one
model, written as PNG figures, summary.json and report.html."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..arguments import dtype_name, positive_int

VISION_DATA = "fashion-mnist"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help="attention analysis report: head importance, distance, patterns, sinks")
    p.add_argument(
        "--model",
        default="gemma-3-270m",
        help="a zoo causal LM (default gemma-3-270m), 'fashion-vit' (the ViT of scripts/train_fashion_vit.py), or a "
        "local Hugging Face model directory (image classifier or causal LM)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="vision: 'fashion-mnist' (default; test split); text: a UTF-8 file of paragraphs separated by blank "
        "lines (default: BoolQ passages from the offline eval data)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="images (default 1000) or text windows (default 8)")
    p.add_argument("--seq-len", type=int, default=96, help="tokens per text window (default 96)")
    p.add_argument("--score-last", type=int, default=32, help="text: next-token predictions scored per window")
    p.add_argument("--queries", type=int, default=None, help="sampled queries per sequence and layer (8 / 16)")
    p.add_argument("--clusters", type=int, default=8, help="pattern clusters (default 8)")
    p.add_argument("--ae-steps", type=int, default=1500, help="pattern autoencoder training steps (default 1500)")
    p.add_argument("--no-taylor", action="store_true", help="skip the Taylor (gradient) importance score")
    p.add_argument(
        "--dtype", type=dtype_name, default="float32", help="text models: float32 (default), bfloat16 or float16"
    )
    p.add_argument("--device-map", default=None)
    p.add_argument("--cache-dir", default=None, help="model cache (default: $ATTNPATCH_CACHE or ~/.cache/attnpatch)")
    p.add_argument("--no-screenshot", action="store_true", help="do not render report.html in headless Chromium")
    p.add_argument("--out", default="attnpatch-out/analysis", help="output directory")
    return p


def _is_image_classifier(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForImageClassification") for a in architectures)


def _vision(args: argparse.Namespace):
    from . import data, run

    if args.model == data.FASHION_VIT:
        model = data.load_fashion_vit(args.cache_dir)
    else:
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(args.model, local_files_only=True).eval()
    if args.data not in (None, VISION_DATA):
        raise SystemExit(f"--data {args.data!r}: vision models are analysed on {VISION_DATA!r} only")
    images, labels = data.load_fashion_mnist("test")
    n = args.limit or 1000
    return run.analyze_vision(
        model, data.fashion_pixels(images[:n]), labels[:n], args.out, queries=args.queries or 8,
        clusters=args.clusters, ae_steps=args.ae_steps, taylor=not args.no_taylor,
        name=os.path.basename(os.path.normpath(args.model)), screenshot=not args.no_screenshot,
    )  # fmt: skip


def _load_text(args: argparse.Namespace):
    """A zoo causal LM by name, or a local Hugging Face causal LM directory (model + tokenizer), in eval mode."""
    import torch

    dtype = getattr(torch, args.dtype)
    if not os.path.isdir(args.model):
        from ..models import load

        model, tok = load(args.model, dtype=dtype, cache_dir=args.cache_dir, device_map=args.device_map)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    if args.device_map is None and torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tok


def _text(args: argparse.Namespace):
    import torch

    from . import data, run

    model, tok = _load_text(args)
    texts = data.read_texts(args.data) if args.data else data.task_texts("boolq", limit=256)
    inputs = data.text_windows(tok, texts, args.seq_len, args.limit or 8)
    torch.manual_seed(0)
    return run.analyze_text(
        model, tok, inputs, args.out, score_last=args.score_last, queries=args.queries or 16,
        clusters=args.clusters, ae_steps=args.ae_steps, taylor=not args.no_taylor, name=args.model,
        screenshot=not args.no_screenshot,
    )  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    from .data import FASHION_VIT

    vision = args.model == FASHION_VIT or (os.path.isdir(args.model) and _is_image_classifier(args.model))
    result = _vision(args) if vision else _text(args)
    imp, prof = result.importance, result.profile
    print(f"baseline accuracy {imp.baseline_accuracy:.4f} on {imp.items} items ({imp.task})")
    for row in imp.ranking("prob_drop", top=5):
        layer, head = row["layer"], row["head"]
        acc, flip = float(imp.accuracy_drop[layer, head]), float(imp.flip_rate[layer, head])
        print(f"  L{layer}H{head}: prob drop {row['value']:.4f}, accuracy drop {acc:.4f}, flip rate {flip:.4f}")
    trend = prof.layer_trend()["mean"]
    print("mean attention distance by layer: " + ", ".join(f"{d:.2f}" for d in trend))
    print(f"pattern clusters: sizes {result.patterns.sizes()}")
    print(f"wrote {result.html} and {len(result.figures)} figures in {result.out_dir}")
    return 0
