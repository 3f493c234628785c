"""Inputs shared by the kernel tests: random q/k/v with planted sinks, HF-style 4-D causal masks."""

from __future__ import annotations

import torch


def planted(b, hq, hkv, lq, lk, d, *, sinks=(0, 5), dtype=torch.float32, seed=0):
    """Random q/k/v where the keys at `sinks` (positions among the Lk keys) attract every query."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    q = q + 3.0 * u
    for s in sinks:
        k[:, :, s] += 3.0 * u
    return q.to(dtype), k.to(dtype), v.to(dtype)


def causal_mask(b, lq, lk, pad=None):
    """Bottom-right aligned causal bool mask [B, 1, Lq, Lk]; `pad[i]` left-padded keys hidden for row i."""
    m = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None].repeat(b, 1, 1, 1)
    for i, p in enumerate(pad or []):
        m[i, :, :, :p] = False
    return m
