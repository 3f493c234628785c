"""Tiny ViTs and synthetic attention calls with known behaviour, for the analysis tests."""

from __future__ import annotations

import torch

from attnpatch.methods.base import AttentionCall

DECISIVE = (1, 2)  # (layer, head) that decides the predictions of `decisive_vit`


def tiny_vit(seed: int = 0, *, image_size: int = 16, layers: int = 2, labels: int = 3, attn: str = "sdpa"):
    """A random HF ViTForImageClassification of grey images: 4x4 patches, 4 heads of dim 8, fp32 eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.ViTConfig(
        image_size=image_size, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=64, num_labels=labels,
    )  # fmt: skip
    model = tf.ViTForImageClassification(cfg)
    model.set_attn_implementation(attn)
    return model.eval()


def decisive_vit(seed: int = 0):
    """tiny_vit whose head DECISIVE writes 8x its usual output into the residual stream and every other head of its
    layer half its usual; the classifier is sharpened so that predictions are confident, and its bias centres the
    logits of random images so that they spread over the classes (whatever the random initialisation, which differs
    between torch versions)."""
    model = tiny_vit(seed)
    layer, head = DECISIVE
    d = 8
    with torch.no_grad():
        weight = model.vit.layers[layer].attention.o_proj.weight
        for h in range(4):
            weight[:, h * d : (h + 1) * d] *= 8.0 if h == head else 0.5
        model.classifier.weight *= 10.0
        probe = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
        model.classifier.bias -= model(pixel_values=probe).logits.mean(0)
    return model


def _call(q: torch.Tensor, k: torch.Tensor, **kw) -> AttentionCall:
    return AttentionCall(layer=kw.pop("layer", 0), query=q, key=k, value=k, scale=1.0, base=lambda: None, **kw)


def left_neighbour_call(grid: tuple[int, int], prefix: int = 1, batch: int = 2, strength: float = 30.0):
    """Image call [B, 2 heads, L, L] (L = prefix + rows * cols): head 0 attends to the left neighbour of each patch
    (the right one in column 0), head 1 uniformly to every key. Keys are one-hot tokens, queries point at the
    target."""
    rows, cols = grid
    n = prefix + rows * cols
    k = torch.eye(n).expand(batch, 1, n, n).clone()
    q = torch.zeros(batch, 2, n, n)
    for t in range(prefix, n):
        r, c = divmod(t - prefix, cols)
        target = prefix + r * cols + (c - 1 if c > 0 else c + 1)
        q[:, 0, t, target] = strength
    return _call(q, k, mask=None, causal=False)


def previous_token_call(lengths: list[int], strength: float = 30.0, layer: int = 0) -> AttentionCall:
    """Causal text call, left-padded to max(lengths), 2 heads: head 0 attends to the previous token (the first
    token to itself), head 1 to the first real token (a sink). Pad rows see nothing; mask is transformers' bool
    4-D mask."""
    width = max(lengths)
    b = len(lengths)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i, width - n :] = True
    k = torch.eye(width).expand(b, 1, width, width).clone()
    q = torch.zeros(b, 2, width, width)
    for i, n in enumerate(lengths):
        first = width - n
        for t in range(first, width):
            q[i, 0, t, max(first, t - 1)] = strength
            q[i, 1, t, first] = strength
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :] & valid[:, :, None])[:, None]
    return _call(q, k, mask=mask, causal=True, query_valid=valid, layer=layer)
