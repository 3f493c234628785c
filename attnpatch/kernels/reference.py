"""Slow, obviously-correct materialised versions of every op: the test oracle. Computes in float64.

Everything here builds the full [B, H, Lq, Lk] probability matrix; use it on small inputs only.
"""

from __future__ import annotations

import torch

from .masking import dense_bias_and_visibility


def _masked_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits [B, Hq, Lq, Lk] with -inf at hidden keys, and the visibility [B, 1|Hq, Lq, Lk]."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    k = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    logits = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    bias, visible = dense_bias_and_visibility(
        mask, lq, lk, causal=causal, sliding_window=sliding_window, device=q.device
    )
    if bias is not None:
        logits = logits + bias.double()
    return logits.masked_fill(~visible, float("-inf")), visible


def attention_probs(q: torch.Tensor, k: torch.Tensor, **kw) -> torch.Tensor:
    """Softmax probabilities [B, Hq, Lq, Lk] in float64; hidden keys get 0, rows that see no key are all 0.

    Keywords: scale, mask (transformers' 4-D bool or additive mask), causal, sliding_window, softcap.
    """
    logits, _ = _masked_logits(q, k, **kw)
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [B, Hq, Lq, D] and log-sum-exp [B, Hq, Lq] in float64 (keywords as `attention_probs`)."""
    logits, _ = _masked_logits(q, k, **kw)
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    v = v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return probs @ v, torch.logsumexp(logits, dim=-1)


def act(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    beta: float,
    threshold: float,
    keep_first_sink: bool = True,
    min_visible_rows: int = 1,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    query_valid: torch.Tensor | None = None,
    history: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_offset: int = 0,
) -> dict[str, torch.Tensor]:
    """ACT (Yu et al., ICML 2024) on materialised probabilities, following the authors' per-row rule.

    Column statistic: key j's summed probability over the valid query rows that see it, divided by their number,
    accumulated on top of `history` = (colsum [B, Hq, T], count [B, 1|Hq, T]) indexed by absolute key position; this
    call's keys sit at absolute positions [key_offset, key_offset + Lk). Sinks: mean > threshold among keys seen by
    at least `min_visible_rows` rows; the lowest-position sink of each (sequence, head) is kept when
    `keep_first_sink`. Each valid row then scales its sink probabilities by beta and hands the freed mass to its
    other keys in proportion: P'_j = P_j + (1 - beta) S P_j / (1 - S).

    Returns out [B, Hq, Lq, D], probs (calibrated) [B, Hq, Lq, Lk], colsum, count, sinks [B, Hq, T] (float64/bool).
    """
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    logits, visible = _masked_logits(
        q, k, scale=scale, mask=mask, causal=causal, sliding_window=sliding_window, softcap=softcap
    )
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    if query_valid is None:
        query_valid = visible.any(-1).all(1).expand(b, lq)
    row_w = query_valid.double()[:, None, :, None]  # [B, 1, Lq, 1]

    total = key_offset + lk
    colsum = torch.zeros(b, hq, total, dtype=torch.float64, device=q.device)
    count = torch.zeros(b, visible.shape[1], total, dtype=torch.float64, device=q.device)
    if history is not None:
        hist_sum, hist_count = history
        colsum[..., : hist_sum.shape[-1]] += hist_sum.double()
        count[..., : hist_count.shape[-1]] += hist_count.double()
    colsum[..., key_offset:] += (probs * row_w).sum(dim=2)
    count[..., key_offset:] += (visible.double() * row_w).sum(dim=2)

    mean = torch.where(count > 0, colsum / count.clamp_min(1), torch.zeros_like(colsum))
    sinks = (mean > threshold) & (count >= min_visible_rows)
    if keep_first_sink:
        for bi in range(b):
            for h in range(hq):
                found = sinks[bi, h].nonzero()
                if len(found):
                    sinks[bi, h, found[0, 0]] = False

    current = sinks[..., key_offset:]  # [B, Hq, Lk]
    calibrated = probs.clone()
    for bi in range(b):
        for h in range(hq):
            cols = current[bi, h]
            for i in range(lq):
                if not query_valid[bi, i]:
                    continue
                row = probs[bi, h, i]
                s = row[cols].sum()
                rest = row[~cols].sum()
                if rest <= 0:  # every visible key is a sink: nowhere to give the mass, leave the row alone
                    continue
                calibrated[bi, h, i, cols] = beta * row[cols]
                # divide by the non-sink mass itself, not 1 - s: that difference cancels when s is close to 1
                calibrated[bi, h, i, ~cols] = row[~cols] + (1 - beta) * s * row[~cols] / rest
    vv = v.double().repeat_interleave(hq // v.shape[1], dim=1)
    return {"out": calibrated @ vv, "probs": calibrated, "colsum": colsum, "count": count, "sinks": sinks}


def var(
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
    mask: torch.Tensor | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """VAR (Kang et al., ICLR 2025) on materialised probabilities, one (sequence, head, row) at a time.

    sinks, image [B, Lk] bool: sink tokens (from the residual stream) and image tokens among the keys. rows [B, Lq]:
    the rows VAR may change (text after the image; default every row that sees a key). A sequence without a visual
    sink (sink and image) is left alone. A row is image-centric when its image mass V >= summ and, by `convention`,
    "paper": the non-sink share of its image attention W / V >= rho; "code" (the released code): the visual-sink
    portion Vs / sum_img(p + 1e-6) <= rho. Selected rows (with W > 0) scale every sink's probability (text or
    visual) by keep_fraction and give the freed mass to the non-sink image keys in proportion.

    Returns out [B, Hq, Lq, D], probs (redistributed) [B, Hq, Lq, Lk] (float64) and selected [B, Hq, Lq] (bool).
    """
    b, hq, lq, _ = q.shape
    logits, visible = _masked_logits(
        q, k, scale=scale, mask=mask, causal=causal, sliding_window=sliding_window, softcap=softcap
    )
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    if rows is None:
        rows = visible.any(-1).all(1).expand(b, lq)
    new = probs.clone()
    selected = torch.zeros(b, hq, lq, dtype=torch.bool, device=q.device)
    for bi in range(b):
        snk, img = sinks[bi], image[bi]
        if not bool((snk & img).any()):
            continue
        n_img = int(img.sum())
        for h in range(hq):
            for i in range(lq):
                if not rows[bi, i]:
                    continue
                p = probs[bi, h, i]
                mass_img = p[img].sum()
                w = p[img & ~snk].sum()
                if convention == "paper":
                    centric = mass_img > 0 and w / mass_img >= rho
                else:
                    centric = p[img & snk].sum() / (mass_img + n_img * 1e-6) <= rho
                if not (centric and mass_img >= summ and w > 0):
                    continue
                selected[bi, h, i] = True
                budget = (1 - keep_fraction) * p[snk].sum()
                new[bi, h, i, snk] = keep_fraction * p[snk]
                ins = img & ~snk
                new[bi, h, i, ins] = p[ins] + budget * p[ins] / w
    vv = v.double().repeat_interleave(hq // v.shape[1], dim=1)
    return {"out": new @ vv, "probs": new, "selected": selected}


def outlook(
    attn_logits: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    padding: int,
    stride: int,
    scale: float,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """timm's `OutlookAttention.forward` between its linear layers, line by line, in float64 (`dtype`: the same math
    in another precision, e.g. the input dtype as timm runs it).

    v [B, H, W, C] (`self.v(x)`), attn_logits [B, h, w, heads*K^4] (`self.attn(self.pool(x))`); returns the folded
    result permuted to channels-last [B, H, W, C] (what timm hands to `self.proj`). timm's h, w are ceil(H/stride),
    ceil(W/stride); here they are read off attn_logits.
    """
    import torch.nn.functional as F

    B, H, W, C = v.shape
    h, w = attn_logits.shape[1:3]
    k = kernel_size
    num_heads = attn_logits.shape[-1] // k**4
    v = v.to(dtype).permute(0, 3, 1, 2)  # B, C, H, W
    v = F.unfold(v, kernel_size=k, padding=padding, stride=stride)
    v = v.reshape(B, num_heads, C // num_heads, k * k, h * w).permute(0, 1, 4, 3, 2)  # B, n, hw, kk, C/n
    attn = attn_logits.to(dtype).reshape(B, h * w, num_heads, k * k, k * k).permute(0, 2, 1, 3, 4)  # B, n, hw, kk, kk
    attn = attn * scale
    attn = attn.softmax(dim=-1)
    x = (attn @ v).permute(0, 1, 4, 3, 2).reshape(B, C * k * k, h * w)
    x = F.fold(x, output_size=(H, W), kernel_size=k, padding=padding, stride=stride)
    return x.permute(0, 2, 3, 1)
