"""Differentiable attention with a dense additive logit bias, returning the probabilities: the op behind the
training adapters (adversarial logit perturbations and their gradient, probability probes, key biases).

Training needs what a flash kernel hides: the [B, H, Lq, Lk] probabilities (probes, regularisers) and the gradient of
the loss with respect to a dense pre-softmax perturbation (dS = P * (dP - rowsum(dP * P)), which autograd gives here).
The bias itself is O(B * H * Lq * Lk), so this materialised path costs the same order of memory as the input it
takes; it is PyTorch on every device (no Triton kernel: a fused one would need a dense-bias input and a dS output).
Statistics and softmax run in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import KeyRanges, dense_bias_and_visibility


@dataclass
class BiasedAttention:
    """out [B, Hq, Lq, D] in q's dtype; probs [B, Hq, Lq, Lk] (0 at hidden keys); logits [B, Hq, Lq, Lk]: the scores
    after scale and softcap, before mask and bias; visible [B|1, 1|Hq, Lq, Lk] bool."""

    out: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    visible: torch.Tensor


def _check_bias(bias: torch.Tensor, shape: tuple[int, int, int, int], name: str) -> None:
    ok = bias.dim() == 4 and all(b in (1, s) for b, s in zip(bias.shape, shape, strict=True))
    if not ok:
        raise ValueError(
            f"{name} has shape {tuple(bias.shape)}; it must broadcast to [batch, heads, queries, keys] = {list(shape)} "
            "with each size equal or 1"
        )


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | KeyRanges | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    bias_name: str = "bias",
) -> BiasedAttention:
    """softmax(q k^T * scale [softcapped] + bias, hidden keys excluded) v for q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D].

    `bias` broadcasts to [B, Hq, Lq, Lk]; it is zeroed at hidden keys (so its gradient there is 0). Mask arguments as
    in `attention`. Rows that see no key give out 0 and probs 0. `dropout` (training) drops probabilities after the
    softmax, as transformers' eager attention does; `probs` are the ones before dropout.
    """
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    dtype = torch.promote_types(q.dtype, torch.float32)
    rep = hq // k.shape[1]
    k = k.to(dtype).repeat_interleave(rep, dim=1)
    v_full = v.to(dtype).repeat_interleave(rep, dim=1)
    logits = q.to(dtype) @ k.transpose(-1, -2) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    mask_bias, visible = dense_bias_and_visibility(
        mask, lq, lk, causal=causal, sliding_window=sliding_window, device=q.device
    )
    scores = logits if mask_bias is None else logits + mask_bias.to(dtype)
    if bias is not None:
        _check_bias(bias, (b, hq, lq, lk), bias_name)
        scores = scores + bias.to(dtype).masked_fill(~visible, 0.0)
    scores = scores.masked_fill(~visible, torch.finfo(dtype).min)
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    probs = probs * visible.any(dim=-1, keepdim=True)  # rows that see no key: 0, not uniform
    dropped = torch.nn.functional.dropout(probs, p=dropout, training=True) if dropout > 0 else probs
    out = (dropped @ v_full).to(q.dtype)
    return BiasedAttention(out=out, probs=probs, logits=logits, visible=visible)
