"""VOLO outlook attention in Triton: unfold + softmax over the K*K sources + AV + fold in one pass, and its backward.

Layouts (any strides): values v [B, H, W, C] (channels-last, head n owns channels [n*c, (n+1)*c)), logits
[B, h, w, n*K^4] with last-axis index head*K^4 + i*K^2 + j (i: the output position inside the window, j: the source
position), out and its gradient [B, H, W, C]. Window (wy, wx) covers the pixels (wy*s - pad + ky, wx*s - pad + kx),
0 <= ky, kx < K; position k = ky*K + kx. Sources outside the image are zero padding (they keep their share of the
softmax); outputs outside the image are dropped, as F.fold does.

Every output is computed by gathering, so no atomics and the results are deterministic:
- forward: one program per (pixel block, batch x head, channel block); each pixel visits the <= ceil(K/s)^2 windows
  that cover it, takes the softmax of the logits row it owns in each (fp32 LSE in registers, online over the K*K
  entries), and pulls the K*K source values of that window. Each (window, row) belongs to exactly one pixel, so
  nothing is recomputed. It also stores the row's log-sum-exp (base 2) for the backward.
- backward, logits: one program per (window block, batch x head): dP[i, j] = dO[pixel(i)] . v[source(j)] over the
  whole head, then dS = scale * P * (dP - sum_j P dP); every row is written, rows whose pixel lies outside get 0.
- backward, values: one program per (pixel block, batch x head, channel block), by the same covering rule as the
  forward: dv[q] = sum over windows w covering q, rows i: P[w, i, j(q)] * dO[pixel(w, i)], P from the stored LSE.

Tiles are 2-D ([rows, channels], channels contiguous) and the K*K sources are a loop, not a tensor axis: a
[rows, K*K, channels] tile needs 3-D pointer tensors and spills registers (checked with ptxas for sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blocks import LOG2E
from .common import strides4, upcast

ROW_TILE_ELEMENTS = 1024  # rows x channels of the accumulator tile (2048 spilled on sm_80 at 64 channels, K = 8)


@triton.jit
def _covering_window(y, x, p_ok, t_y, t_x, GH, GW, K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr):
    """Window (wy, wx), the (t_y, t_x)-th back from the last one whose corner is at or above-left of pixel (y, x);
    the pixel's position k inside it; whether the pixel is valid (`p_ok`) and that window exists and covers it
    (indices are 0 where not)."""
    wy = (y + PAD) // STRIDE - t_y
    wx = (x + PAD) // STRIDE - t_x
    ky = y + PAD - wy * STRIDE
    kx = x + PAD - wx * STRIDE
    ok = p_ok & (wy >= 0) & (wy < GH) & (wx >= 0) & (wx < GW) & (ky < K) & (kx < K)
    return tl.where(ok, wy, 0), tl.where(ok, wx, 0), tl.where(ok, ky * K + kx, 0), ok


@triton.jit
def _window_pixel(wy, wx, ok, H, W, k, K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr):
    """Pixel (py, px) at position k of each window (0 where outside the image) and whether it is inside."""
    py = wy * STRIDE - PAD + k // K
    px = wx * STRIDE - PAD + k % K
    inside = ok & (py >= 0) & (py < H) & (px >= 0) & (px < W)
    return tl.where(inside, py, 0), tl.where(inside, px, 0), inside


@triton.jit
def _pixel_tile(base, py, px, chan, ok, c_ok, stride_y, stride_x, stride_c, UPCAST: tl.constexpr):
    """The [pixels, channels] tile of a [H, W, C] image at `base` at pixels (py, px), channels `chan` (0 where the
    pixel is not `ok` or the channel not `c_ok`), fp32 when UPCAST."""
    ptr = base + py * stride_y + px * stride_x
    tile = tl.load(ptr[:, None] + chan[None, :] * stride_c, mask=ok[:, None] & c_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_pixel_tile(base, y, x, chan, p_ok, c_ok, stride_y, stride_x, stride_c, acc):
    """Store acc [pixels, channels] at pixels (y, x), channels `chan` of the [H, W, C] image at `base` (its dtype)."""
    ptr = base + y * stride_y + x * stride_x
    tl.store(ptr[:, None] + chan[None, :] * stride_c, acc.to(base.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _prob(logit, ok, scale_log2, lse):
    """exp2(logit * scale_log2 - lse) of one logit per row at the pointers `logit` (base-2 LSE; 0 where not ok)."""
    s = tl.load(logit, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, tl.exp2(s * scale_log2 - lse), 0.0)


@triton.jit
def _row_logits(row, stride_lc, ok, scale_log2, KK: tl.constexpr, KK_PAD: tl.constexpr):
    """One logits row per entry of `row` as a [rows, KK_PAD] tile in base 2 (-inf where absent) and its base-2 LSE
    (0 for rows not `ok`)."""
    jj = tl.arange(0, KK_PAD)
    present = ok[:, None] & (jj < KK)[None, :]
    s = tl.load(row[:, None] + jj[None, :] * stride_lc, mask=present, other=0.0).to(tl.float32) * scale_log2
    s = tl.where(present, s, float("-inf"))
    m = tl.where(ok, tl.max(s, 1), 0.0)
    total = tl.where(ok, tl.sum(tl.exp2(s - m[:, None]), 1), 1.0)
    return s, m + tl.log2(total)


@triton.jit
def _row_lse(row, stride_lc, ok, scale_log2, KK: tl.constexpr):
    """Base-2 LSE of one logits row per entry of `row` (online over its K*K entries; 0 for rows not `ok`)."""
    m = tl.full(row.shape, float("-inf"), tl.float32)
    total = tl.zeros(row.shape, tl.float32)
    for j in range(KK):
        s_j = tl.load(row + j * stride_lc, mask=ok, other=0.0).to(tl.float32) * scale_log2
        m_new = tl.maximum(m, s_j)
        total = total * tl.exp2(m - m_new) + tl.exp2(s_j - m_new)
        m = m_new
    return tl.where(ok, m + tl.log2(total), 0.0)


@triton.jit
def _pixel_block(LOGITS, stride_lb, stride_lc, N_HEADS, H, W, HEAD_DIM,
                 KK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """The pixels and channels of this program (grid: pixel blocks, batch * heads, channel blocks): batch, head,
    pixel indices with their validity and (y, x), channel offsets with their validity, global channels, and the
    base pointer of this head's logits."""
    bh = tl.program_id(1)
    b = bh // N_HEADS
    head = bh % N_HEADS
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < H * W
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < HEAD_DIM
    chan = head * HEAD_DIM + offs_c
    l_base = LOGITS + b.to(tl.int64) * stride_lb + head * (KK * KK) * stride_lc
    return b, head, offs_p, p_ok, offs_p // W, offs_p % W, offs_c, c_ok, chan, l_base


@triton.jit
def _outlook_fwd(
    LOGITS, V, OUT, LSE,
    stride_lb, stride_ly, stride_lx, stride_lc,
    stride_vb, stride_vy, stride_vx, stride_vc,
    stride_ob, stride_oy, stride_ox, stride_oc,
    N_HEADS, H, W, GH, GW, HEAD_DIM, scale_log2,
    K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, COVER: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STORE_LSE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    KK: tl.constexpr = K * K
    b, head, offs_p, p_ok, y, x, offs_c, c_ok, chan, l_base = _pixel_block(
        LOGITS, stride_lb, stride_lc, N_HEADS, H, W, HEAD_DIM, KK, BLOCK_P, BLOCK_C
    )
    v_base = V + b.to(tl.int64) * stride_vb
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(COVER * COVER):
        wy, wx, i, ok = _covering_window(y, x, p_ok, t // COVER, t % COVER, GH, GW, K, STRIDE, PAD)
        row = l_base + wy * stride_ly + wx * stride_lx + i * KK * stride_lc  # the row this pixel owns
        lse = _row_lse(row, stride_lc, ok, scale_log2, KK)
        for j in range(KK):
            sy, sx, inside = _window_pixel(wy, wx, ok, H, W, j, K, STRIDE, PAD)
            v_j = _pixel_tile(v_base, sy, sx, chan, inside, c_ok, stride_vy, stride_vx, stride_vc, UPCAST)
            acc += _prob(row + j * stride_lc, ok, scale_log2, lse)[:, None] * v_j
        if STORE_LSE:
            if tl.program_id(2) == 0:
                lse_at = ((b.to(tl.int64) * GH + wy) * GW + wx) * (N_HEADS * KK) + head * KK + i
                tl.store(LSE + lse_at, lse, mask=ok)
    _store_pixel_tile(OUT + b.to(tl.int64) * stride_ob, y, x, chan, p_ok, c_ok, stride_oy, stride_ox, stride_oc, acc)


@triton.jit
def _outlook_bwd_logits(
    LOGITS, V, DOUT, DLOGITS,
    stride_lb, stride_ly, stride_lx, stride_lc,
    stride_vb, stride_vy, stride_vx, stride_vc,
    stride_gb, stride_gy, stride_gx, stride_gc,
    stride_db, stride_dy, stride_dx, stride_dc,
    N_HEADS, H, W, GH, GW, HEAD_DIM, scale, scale_log2,
    K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, KK_PAD: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    KK: tl.constexpr = K * K
    bh = tl.program_id(1)
    b = bh // N_HEADS
    head = bh % N_HEADS
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = offs_w < GH * GW
    wy = tl.where(w_ok, offs_w // GW, 0)
    wx = tl.where(w_ok, offs_w % GW, 0)
    jj = tl.arange(0, KK_PAD)
    offs_c = tl.arange(0, BLOCK_C)
    v_base = V + b.to(tl.int64) * stride_vb
    g_base = DOUT + b.to(tl.int64) * stride_gb
    l_base = LOGITS + b.to(tl.int64) * stride_lb + head * (KK * KK) * stride_lc + wy * stride_ly + wx * stride_lx
    d_base = DLOGITS + b.to(tl.int64) * stride_db + head * (KK * KK) * stride_dc + wy * stride_dy + wx * stride_dx
    for i in range(KK):
        # row i of each window: its output pixel's gradient against the values of the window's K*K sources
        oy, ox, o_ok = _window_pixel(wy, wx, w_ok, H, W, i, K, STRIDE, PAD)
        s, lse = _row_logits(l_base + i * KK * stride_lc, stride_lc, w_ok, scale_log2, KK, KK_PAD)
        prob = tl.exp2(s - lse[:, None])  # 0 where absent (s = -inf)
        dp = tl.zeros([BLOCK_W, KK_PAD], dtype=tl.float32)
        for c0 in range(0, HEAD_DIM, BLOCK_C):
            c_ok = (c0 + offs_c) < HEAD_DIM
            chan = head * HEAD_DIM + c0 + offs_c
            g = _pixel_tile(g_base, oy, ox, chan, o_ok, c_ok, stride_gy, stride_gx, stride_gc, True)
            for j in range(KK):
                sy, sx, inside = _window_pixel(wy, wx, w_ok, H, W, j, K, STRIDE, PAD)
                v_j = _pixel_tile(v_base, sy, sx, chan, inside, c_ok, stride_vy, stride_vx, stride_vc, True)
                dp += tl.where(jj[None, :] == j, tl.sum(g * v_j, 1)[:, None], 0.0)
        ds = prob * (dp - tl.sum(prob * dp, 1)[:, None]) * scale
        tl.store(
            d_base[:, None] + (i * KK + jj)[None, :] * stride_dc,
            ds.to(DLOGITS.dtype.element_ty),
            mask=w_ok[:, None] & (jj < KK)[None, :],
        )


@triton.jit
def _outlook_bwd_v(
    LOGITS, LSE, DOUT, DV,
    stride_lb, stride_ly, stride_lx, stride_lc,
    stride_gb, stride_gy, stride_gx, stride_gc,
    stride_db, stride_dy, stride_dx, stride_dc,
    N_HEADS, H, W, GH, GW, HEAD_DIM, scale_log2,
    K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, COVER: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    KK: tl.constexpr = K * K
    b, head, offs_p, p_ok, y, x, offs_c, c_ok, chan, l_base = _pixel_block(
        LOGITS, stride_lb, stride_lc, N_HEADS, H, W, HEAD_DIM, KK, BLOCK_P, BLOCK_C
    )
    g_base = DOUT + b.to(tl.int64) * stride_gb
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(COVER * COVER):
        # this pixel is source j of window w; the rows i of w whose pixel is inside the image sent it gradient
        wy, wx, j, ok = _covering_window(y, x, p_ok, t // COVER, t % COVER, GH, GW, K, STRIDE, PAD)
        col = l_base + wy * stride_ly + wx * stride_lx + j * stride_lc
        lse_row = LSE + ((b.to(tl.int64) * GH + wy) * GW + wx) * (N_HEADS * KK) + head * KK
        for i in range(KK):
            oy, ox, o_ok = _window_pixel(wy, wx, ok, H, W, i, K, STRIDE, PAD)
            lse = tl.load(lse_row + i, mask=o_ok, other=0.0)
            g = _pixel_tile(g_base, oy, ox, chan, o_ok, c_ok, stride_gy, stride_gx, stride_gc, UPCAST)
            acc += _prob(col + i * KK * stride_lc, o_ok, scale_log2, lse)[:, None] * g
    _store_pixel_tile(DV + b.to(tl.int64) * stride_db, y, x, chan, p_ok, c_ok, stride_dy, stride_dx, stride_dc, acc)


def _blocks(head_dim: int) -> tuple[int, int]:
    """(rows per program, channel block): a [rows, channels] accumulator of about ROW_TILE_ELEMENTS."""
    block_c = max(16, min(triton.next_power_of_2(head_dim), 64))  # 3 channel blocks: 3 compiled variants
    return max(16, min(64, ROW_TILE_ELEMENTS // block_c)), block_c


def _geometry(logits: torch.Tensor, v: torch.Tensor, kernel_size: int, stride: int) -> dict[str, int]:
    b, h, w, c_all = v.shape
    heads = logits.shape[-1] // kernel_size**4
    kk_pad = triton.next_power_of_2(kernel_size * kernel_size)
    return dict(
        B=b, H=h, W=w, GH=logits.shape[1], GW=logits.shape[2], heads=heads, head_dim=c_all // heads,
        cover=-(-kernel_size // stride), kk_pad=kk_pad,
    )  # fmt: skip


def outlook_forward(
    logits: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel_size: int,
    padding: int,
    stride: int,
    scale: float,
    store_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out [B, H, W, C] (contiguous, v's dtype) and, with `store_lse`, the base-2 LSE of every row whose pixel lies
    inside the image, [B, h, w, heads, K*K] fp32 (other rows are left unset)."""
    g = _geometry(logits, v, kernel_size, stride)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    lse = None
    if store_lse:
        shape = (g["B"], g["GH"], g["GW"], g["heads"], kernel_size * kernel_size)
        lse = torch.empty(shape, dtype=torch.float32, device=v.device)
    block_p, block_c = _blocks(g["head_dim"])
    grid = (triton.cdiv(g["H"] * g["W"], block_p), g["B"] * g["heads"], triton.cdiv(g["head_dim"], block_c))
    _outlook_fwd[grid](
        logits, v, out, lse if lse is not None else out,
        *strides4(logits), *strides4(v), *strides4(out),
        g["heads"], g["H"], g["W"], g["GH"], g["GW"], g["head_dim"], float(scale) * LOG2E,
        K=kernel_size, STRIDE=stride, PAD=padding, COVER=g["cover"], BLOCK_P=block_p, BLOCK_C=block_c,
        STORE_LSE=store_lse, UPCAST=upcast(v.dtype), num_warps=4,
    )  # fmt: skip
    return out, lse


def outlook_backward(
    logits: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    kernel_size: int,
    padding: int,
    stride: int,
    scale: float,
    need_logits: bool = True,
    need_v: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. the logits and the values (in their dtypes), each only when asked for."""
    g = _geometry(logits, v, kernel_size, stride)
    block, block_c = _blocks(g["head_dim"])
    d_logits = d_v = None
    if need_logits:
        d_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grid = (triton.cdiv(g["GH"] * g["GW"], block), g["B"] * g["heads"])
        _outlook_bwd_logits[grid](
            logits, v, grad_out, d_logits,
            *strides4(logits), *strides4(v), *strides4(grad_out), *strides4(d_logits),
            g["heads"], g["H"], g["W"], g["GH"], g["GW"], g["head_dim"], float(scale), float(scale) * LOG2E,
            K=kernel_size, STRIDE=stride, PAD=padding, KK_PAD=g["kk_pad"], BLOCK_W=block, BLOCK_C=block_c,
            num_warps=4,
        )  # fmt: skip
    if need_v:
        d_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        grid = (triton.cdiv(g["H"] * g["W"], block), g["B"] * g["heads"], triton.cdiv(g["head_dim"], block_c))
        _outlook_bwd_v[grid](
            logits, lse, grad_out, d_v,
            *strides4(logits), *strides4(grad_out), *strides4(d_v),
            g["heads"], g["H"], g["W"], g["GH"], g["GW"], g["head_dim"], float(scale) * LOG2E,
            K=kernel_size, STRIDE=stride, PAD=padding, COVER=g["cover"], BLOCK_P=block, BLOCK_C=block_c,
            UPCAST=upcast(v.dtype), num_warps=4,
        )  # fmt: skip
    return d_logits, d_v
