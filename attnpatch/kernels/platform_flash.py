"""Attention with its log-sum-exp on PyTorch's own CPU flash kernel (`aten::_scaled_dot_product_flash_attention_for_
cpu`, what SDPA runs on CPU): the first pass of ACT and VAR at SDPA's cost.

The kernel takes a causal flag (top-left aligned, our convention for a call without a mask) or an additive mask in
the query's dtype. A call without a mask is one kernel call; any other mask (4-D, KeyRanges, a sliding window) is
turned into an additive float32 mask one block of query rows at a time, over only the keys those rows see, so the
extra memory stays one block. Inputs run in float32 whatever their dtype (the output stays float32 for the caller's
corrections); GQA repeats K/V per query head (O(Lk) per head, no [Lq, Lk] tensor). Softcapping is not something the
kernel does: such calls stay on the blocked path.
"""

from __future__ import annotations

import torch

from .blocks import default_kv_heads, key_extent
from .masking import KeyRanges, block_bias_and_visibility, structural_ranges

ROW_BLOCK = 256  # query rows per kernel call when a mask is built block by block (128-256 measured fastest)


def _kernel():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def unsupported(q: torch.Tensor, *, softcap: float | None) -> str | None:
    """Why the CPU flash kernel cannot take this call, or None when it can."""
    if q.device.type != "cpu":
        return f"the tensors are on {q.device.type}"
    if _kernel() is None:
        return f"torch {torch.__version__} has no CPU flash-attention kernel"
    if softcap is not None:
        return "logit softcapping"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    return None


def _per_query_head(x: torch.Tensor, kv_head_index: torch.Tensor, hq: int) -> torch.Tensor:
    """K or V with one head per query head: a stride-0 view for one kv head, else a gather (O(Lk) per head)."""
    if x.shape[1] == 1:
        return x.expand(x.shape[0], hq, *x.shape[2:])
    if x.shape[1] == hq and bool((kv_head_index == torch.arange(hq)).all()):
        return x
    return x.index_select(1, kv_head_index.to(x.device))


def flash_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | KeyRanges | None,
    causal: bool,
    sliding_window: int | None,
    kv_head_index: torch.Tensor | None = None,
    rows_per_call: int = ROW_BLOCK,
    row_spans: list[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Lq, D] float32, natural-log LSE [B, Hq, Lq] float32) of softmax(q k^T * scale) v; rows that see
    no key give 0 and -inf. Same mask conventions as `attention.attention`; check `unsupported` first.
    row_spans: only these [start, end) query rows (the others stay 0 and -inf)."""
    kernel = _kernel()
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    if kv_head_index is None:
        kv_head_index = default_kv_heads(hq, k.shape[1])
    q32 = q.float()
    k32 = _per_query_head(k, kv_head_index.cpu(), hq).float()
    v32 = _per_query_head(v, kv_head_index.cpu(), hq).float()
    out = q32.new_zeros(b, hq, lq, d)
    lse = q32.new_full((b, hq, lq), float("-inf"))
    if lk == 0:
        return out, lse
    if mask is None and row_spans is None and (sliding_window is None or not causal or lq == 1):
        # the kernel's causal flag is top-left aligned, as our rule for a call without a mask; one query sees all
        return kernel(q32, k32, v32, 0.0, causal and lq > 1, scale=scale)
    if mask is None and causal and lq > 1:
        mask = structural_ranges(b, lq, lk, causal=True, sliding_window=sliding_window, device=q.device)
    for start, end in row_spans if row_spans is not None else [(0, lq)]:
        for r0 in range(start, end, rows_per_call):
            r1 = min(end, r0 + rows_per_call)
            k0, k1, additive = _block_mask(mask, r0, r1, lq, lk, causal=causal, sliding_window=sliding_window)
            if k0 == k1:
                continue
            block_out, block_lse = kernel(
                q32[:, :, r0:r1], k32[:, :, k0:k1], v32[:, :, k0:k1], 0.0, False, attn_mask=additive, scale=scale
            )
            out[:, :, r0:r1] = block_out
            if additive is None:
                lse[:, :, r0:r1] = block_lse
            else:  # the kernel reports an LSE of 0 for a row that sees nothing
                lse[:, :, r0:r1] = torch.where(torch.isfinite(additive).any(-1), block_lse, float("-inf"))
    return out, lse


def _block_mask(
    mask: torch.Tensor | KeyRanges | None,
    r0: int,
    r1: int,
    lq: int,
    lk: int,
    *,
    causal: bool,
    sliding_window: int | None,
) -> tuple[int, int, torch.Tensor | None]:
    """(k0, k1, additive float32 mask [B, 1|H, rows, k1 - k0] or None when every row sees every key of [k0, k1))."""
    if mask is None:  # bidirectional, or one query: every key
        return 0, lk, None
    if isinstance(mask, KeyRanges):
        k0, k1, f0, f1 = mask.block_extent(r0, r1)
        if f0 <= k0 and f1 >= k1:
            return k0, k1, None
        bias, visible = None, mask.visibility(r0, r1, k1, first_key=k0)
    else:
        bias, visible = block_bias_and_visibility(
            mask, r0, r1, lq, lk, causal=causal, sliding_window=sliding_window, device=mask.device
        )
        k0, k1 = key_extent(visible, lk)
        bias = None if bias is None else bias[..., k0:k1]
        visible = None if visible is None else visible[..., k0:k1]
    if visible is None:
        return k0, k1, bias
    base = bias if bias is not None else torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    additive = base.masked_fill(~visible, float("-inf"))
    return k0, k1, additive.reshape((1,) * (4 - additive.dim()) + tuple(additive.shape))
