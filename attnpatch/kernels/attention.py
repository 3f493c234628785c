"""Attention forward with the per-row log-sum-exp: a flash-attention kernel in Triton on CUDA; on CPU PyTorch's own
flash kernel (`platform_flash`), or the blocked PyTorch path for what that kernel does not take (softcapping).
GQA without repeating K/V, Lq != Lk (decode, chunked prefill), per-row key intervals (padding,
causal offsets, sliding windows), softcapping; fp16, bf16, fp32; q/k/v with any strides."""

from __future__ import annotations

import torch

from . import backend, platform_flash
from .blocks import (
    DEFAULT_BLOCK_ELEMENTS,
    attend,
    default_kv_heads,
    group_blocks,
    probs_,
    replica_groups,
    take_heads,
)
from .masking import KeyRanges


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    mask: torch.Tensor | KeyRanges | None = None,
    kv_head_index: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v for q [B, Hq, Lq, D] and k, v [B, Hkv, Lk, D]; out is [B, Hq, Lq, D] in q's dtype.

    mask: None (the `causal`/`sliding_window` rules, with SDPA's top-left alignment when Lq > 1), KeyRanges (per-row
    key intervals; `masking.padding_ranges` builds them from a 2-D padding mask with the queries at the end), or
    transformers' 4-D mask. Rows that see no key give 0 (and LSE -inf). With `return_lse`, also the natural-log
    LSE [B, Hq, Lq] in float32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    path, ranges = backend.plan("attention", q, (k, v), mask, causal=causal, sliding_window=sliding_window)
    if path == "triton":
        from ._triton.flash import flash_forward

        out, lse = flash_forward(
            q, k, v, ranges, scale=scale, softcap=softcap, kv_head_index=kv_head_index, return_lse=return_lse
        )
    else:
        out, lse = _attention_torch(
            q, k, v, scale=scale, mask=mask, causal=causal, sliding_window=sliding_window, softcap=softcap,
            kv_head_index=kv_head_index,
        )  # fmt: skip
    return (out, lse) if return_lse else out


def _attention_torch(
    q, k, v, *, scale, mask, causal, sliding_window, softcap, kv_head_index,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out in `out_dtype` (default q's), LSE): the platform's flash kernel when it takes the call, else blocks."""
    if platform_flash.unsupported(q, softcap=softcap) is None:
        out, lse = platform_flash.flash_with_lse(
            q, k, v, scale=scale, mask=mask, causal=causal, sliding_window=sliding_window, kv_head_index=kv_head_index
        )
        return out.to(out_dtype or q.dtype), lse
    return _attention_blocked(
        q, k, v, scale=scale, mask=mask, causal=causal, sliding_window=sliding_window, softcap=softcap,
        kv_head_index=kv_head_index, block_elements=block_elements, out_dtype=out_dtype,
    )  # fmt: skip


def _attention_blocked(
    q, k, v, *, scale, mask, causal, sliding_window, softcap, kv_head_index,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if kv_head_index is None:
        kv_head_index = default_kv_heads(hq, hkv)
    out = torch.empty(b, hq, lq, d, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    for q_idx, kv_idx in replica_groups(kv_head_index.cpu(), hkv):
        q_dev = q_idx.to(q.device)
        v_group = take_heads(v, kv_idx).float()
        blocks = group_blocks(
            q, k, q_idx, kv_idx, scale=scale, softcap=softcap, mask=mask, causal=causal,
            sliding_window=sliding_window, block_elements=block_elements,
        )  # fmt: skip
        for r0, r1, k0, k1, logits in blocks:
            block_lse = torch.logsumexp(logits, dim=-1)
            lse[:, q_dev, r0:r1] = block_lse
            out[:, q_dev, r0:r1] = attend(probs_(logits, block_lse), v_group[:, :, k0:k1]).to(out.dtype)
    return out, lse
