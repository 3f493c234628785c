#!/usr/bin/env python
"""Train the small Fashion-MNIST ViT that the attention analyses use as their vision example, and cache it.

transformers ViTForImageClassification, 28x28 grey images in 4x4 patches (7x7 grid + CLS = 50 tokens), 6 layers of 4
heads, hidden 64. About 3 minutes on one CPU thread to ~85% test accuracy. Writes config.json + model.safetensors
and training.json (accuracy, time, settings) to <cache>/fashion-vit (attnpatch.models.cache_root(), i.e.
$ATTNPATCH_CACHE or ~/.cache/attnpatch), through a temporary folder renamed into place.

    python scripts/train_fashion_vit.py [--epochs 3] [--threads 1] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from attnpatch.analysis.data import fashion_pixels, fashion_vit_dir, load_fashion_mnist  # noqa: E402


def build(args: argparse.Namespace) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(
        image_size=28, patch_size=4, num_channels=1, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=2 * args.hidden, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=10,
        id2label={i: name for i, name in enumerate(
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"))},
    )  # fmt: skip
    config.label2id = {v: k for k, v in config.id2label.items()}
    return transformers.ViTForImageClassification(config)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(pixel_values=x[i : i + batch]).logits.argmax(-1) == y[i : i + batch]).sum())
                  for i in range(0, len(x), batch))  # fmt: skip
    return correct / len(x)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, test_x = fashion_pixels(train_x), fashion_pixels(test_x)
    model = build(args)
    model.set_attn_implementation("sdpa")
    steps = args.epochs * math.ceil(len(train_x) / args.batch_size)
    warmup = min(200, steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            x = train_x[idx]
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s")
        print(f"epoch {epoch}: test accuracy {accuracy(model, test_x, test_y):.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "model": model,
        "test_accuracy": accuracy(model, test_x, test_y),
        "train_seconds": round(seconds, 1),
        "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {k: v for k, v in vars(args).items() if k != "cache_dir"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir", default=None, help="model cache root (default: $ATTNPATCH_CACHE or ~/.cache/attnpatch)"
    )
    args = p.parse_args()
    result = train(args)
    model = result.pop("model")
    target = fashion_vit_dir(args.cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fashion-vit-", dir=target.parent)
    os.chmod(tmp, 0o755)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(result, f, indent=2)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    print(f"test accuracy {result['test_accuracy']:.4f} after {result['train_seconds']:.0f}s; saved to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
