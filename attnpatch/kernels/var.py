"""VAR attention (visual attention redistribution, Kang et al. ICLR 2025): Triton on CUDA, a memory-safe PyTorch
path elsewhere. Neither keeps a [B, H, Lq, Lk] tensor.

Every key has a class per sequence: other, sink (text or visual), image non-sink. One pass over the keys keeps,
besides the row's max and normaliser, the partial normalisers and value accumulators of the classes; the epilogue
tests each (head, row) for image-centricity from the partial masses and emits either the plain output or

    o' = (acc_other + keep * acc_sink + (1 + (1 - keep) l_sink / l_ins) * acc_ins) / l

a sum of non-negative multiples of the class accumulators, so no cancellation whatever the sink mass. Statistics,
softmax and accumulation run in float32 whatever the input dtype; GQA reads each query head's K/V group directly.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    true_runs,
)
from .masking import KeyRanges, MaskMemo

CONVENTIONS = ("paper", "code")
CODE_EPSILON = 1e-6  # the released code adds this to every image probability in the portion's denominator
SINK, IMAGE = 1, 2  # key class bits


@dataclass
class VarOutput:
    out: torch.Tensor  # [B, Hq, Lq, D] in the input dtype
    selected: torch.Tensor | None = None  # [B, Hq, Lq] bool: the redistributed (head, row) pairs
    probs: torch.Tensor | None = None  # [B, Hq, Lq, Lk] redistributed probabilities, only when asked for


def key_classes(sinks: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[B, Lk] int8: bit 0 = sink token, bit 1 = image token."""
    return sinks.to(torch.int8) * SINK + image.to(torch.int8) * IMAGE


def var_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sinks: torch.Tensor,
    image: torch.Tensor,
    rows: torch.Tensor | None = None,
    keep_fraction: float = 0.6,
    rho: float = 0.5,
    summ: float = 0.2,
    convention: str = "paper",
    mask: torch.Tensor | KeyRanges | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    return_selected: bool = False,
    return_probs: bool = False,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    mask_memo: MaskMemo | None = None,
) -> VarOutput:
    """VAR-redistributed attention for q [B, Hq, Lq, D] against k, v [B, Hkv, Lk, D].

    sinks, image [B, Lk] bool: sink tokens and image tokens among the keys. rows [B, Lq] bool: rows VAR may change
    (default: every row that sees a key). A sequence with no visual sink (sink and image) is left alone. A (head, row)
    is image-centric when its image mass V >= summ and, by `convention`, "paper": the non-sink share of its image
    mass >= rho, or "code" (the released code): the visual-sink portion of it (with +1e-6 per image key in the
    denominator) <= rho. Those rows keep `keep_fraction` of every sink's probability and give the rest to the non-sink
    image keys in proportion. mask, causal, sliding_window, softcap, kv_head_index: as `attention`.
    return_selected: also the [B, Hq, Lq] selection; return_probs: also the probabilities (PyTorch path only).
    mask_memo: the forward's masking.MaskMemo.
    """
    b, hq = q.shape[:2]
    hkv, lk = k.shape[1], k.shape[2]
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    for name, t in (("sinks", sinks), ("image", image)):
        if t.shape != (b, lk) or t.dtype != torch.bool:
            raise ValueError(f"{name} must be a [B, Lk] = [{b}, {lk}] bool tensor, got {tuple(t.shape)} {t.dtype}")
    if kv_head_index is None:
        kv_head_index = default_kv_heads(hq, hkv)
    path, ranges, rows = backend.plan_rows(
        "var_attention", q, (k, v), mask, rows, causal=causal, sliding_window=sliding_window,
        return_probs=return_probs, mask_memo=mask_memo,
    )  # fmt: skip
    sinks, image = sinks.to(q.device), image.to(q.device)
    rows = rows & (sinks & image).any(-1, keepdim=True)  # no visual sink in a sequence: VAR leaves it alone
    rule = dict(keep_fraction=keep_fraction, rho=rho, summ=summ, convention=convention)
    classes = key_classes(sinks, image)
    if path == "triton":
        from ._triton.var import var_forward

        out, selected = var_forward(
            q, k, v, ranges, classes, rows, scale=scale, softcap=softcap, kv_head_index=kv_head_index, **rule
        )
        return VarOutput(out=out, selected=selected if return_selected else None)
    return _var_torch(
        q, k, v, classes, rows, scale=scale, mask=mask if ranges is None else ranges, causal=causal,
        sliding_window=sliding_window,
        softcap=softcap, kv_head_index=kv_head_index, return_selected=return_selected, return_probs=return_probs,
        block_elements=block_elements, **rule,
    )  # fmt: skip


def image_centric(
    mass: torch.Tensor,
    visual_sink: torch.Tensor,
    image_non_sink: torch.Tensor,
    n_image: torch.Tensor,
    *,
    rho: float,
    summ: float,
    convention: str,
) -> torch.Tensor:
    """Which rows are image-centric, from their total, visual-sink and non-sink image masses (same shapes)."""
    image_mass = visual_sink + image_non_sink
    if convention == "paper":
        centric = image_non_sink >= rho * image_mass
    else:
        centric = visual_sink <= rho * (image_mass + n_image * CODE_EPSILON * mass)
    return centric & (image_mass >= summ * mass) & (image_non_sink > 0)


def _var_torch(
    q, k, v, classes, rows, *, scale, mask, causal, sliding_window, softcap, kv_head_index, return_selected,
    return_probs, block_elements, keep_fraction, rho, summ, convention,
) -> VarOutput:  # fmt: skip
    """Blocks over the rows VAR may change (a prompt's text after its image); the rows it leaves alone come from
    PyTorch's flash kernel where it takes the call."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    device = q.device
    is_sink = (classes & SINK) > 0
    is_image = (classes & IMAGE) > 0
    # [B, 1, Lk, 3] one-hot class columns: sink, visual sink, image non-sink
    columns = torch.stack([is_sink, is_sink & is_image, is_image & ~is_sink], dim=-1).float()[:, None]
    n_image = is_image.sum(-1).float()[:, None, None]  # [B, 1, 1]
    geometry = dict(mask=mask, causal=causal, sliding_window=sliding_window)
    changing = rows.any(0).cpu()
    if not return_probs and platform_flash.unsupported(q, softcap=softcap) is None:
        # rows VAR leaves alone from PyTorch's flash kernel, the others recomputed block by block; without a mask,
        # one causal kernel call over every row (which skips the hidden tiles itself) beats row blocks with masks
        # unless VAR changes most rows
        one_call = mask is None and 2 * int(changing.sum()) <= lq
        plain, _ = platform_flash.flash_with_lse(
            q, k, v, scale=scale, kv_head_index=kv_head_index, row_spans=None if one_call else true_runs(~changing),
            **geometry,
        )  # fmt: skip
        out, spans = plain.to(q.dtype), true_runs(changing)
    else:
        out, spans = torch.empty(b, hq, lq, d, dtype=q.dtype, device=device), [(0, lq)]
    selected = torch.zeros(b, hq, lq, dtype=torch.bool, device=device)
    probs_out = torch.zeros(b, hq, lq, lk, dtype=torch.float32, device=device) if return_probs else None
    rule = dict(rho=rho, summ=summ, convention=convention)
    for q_idx, kv_idx in replica_groups(kv_head_index.cpu(), hkv):
        q_dev = q_idx.to(device)
        v_group = take_heads(v, kv_idx).float()
        for span in spans:
            blocks = group_blocks(
                q, k, q_idx, kv_idx, scale=scale, softcap=softcap, block_elements=block_elements, rows=span,
                **geometry,
            )  # fmt: skip
            for r0, r1, k0, k1, logits in blocks:
                p = probs_(logits, torch.logsumexp(logits, dim=-1))
                block_columns = columns[:, :, k0:k1]
                sink_mass, visual_sink, ins = (p @ block_columns).unbind(-1)  # [B, n, r] each
                chosen = rows[:, None, r0:r1] & image_centric(torch.ones_like(ins), visual_sink, ins, n_image, **rule)
                gain = torch.where(chosen, (1 - keep_fraction) * sink_mass / ins.clamp_min(1e-30), 0.0)
                w_sink = torch.where(chosen, keep_fraction, 1.0)
                # per-key weight: w_sink on sinks, 1 + gain on non-sink image keys, 1 elsewhere
                sink_cols, ins_cols = block_columns[:, :, None, :, 0], block_columns[:, :, None, :, 2]
                p.mul_(1.0 + (w_sink - 1.0)[..., None] * sink_cols + gain[..., None] * ins_cols)
                out[:, q_dev, r0:r1] = attend(p, v_group[:, :, k0:k1]).to(q.dtype)
                selected[:, q_dev, r0:r1] = chosen
                if probs_out is not None:
                    probs_out[:, q_dev, r0:r1, k0:k1] = p
    return VarOutput(out=out, selected=selected if return_selected else None, probs=probs_out)
