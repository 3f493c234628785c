"""Modules for building new models on attnpatch's kernels.

`OutlookAttention` is timm's `timm.models.volo.OutlookAttention` (same constructor, same parameter names, same
`state_dict`, so weights move between the two either way) whose unfold -> softmax -> AV -> fold runs as one fused op
(`attnpatch.kernels.outlook.outlook_attention`: Triton on CUDA, a memory-conscious PyTorch path elsewhere).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .kernels.outlook import outlook_attention


def fused_outlook_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """timm's `OutlookAttention.forward(x)` for x [B, H, W, C] with the fused op between the module's own layers.

    The linear layers (`v`, `attn`, `proj`), the pooling and `proj_drop` are called as the module's submodules (so
    LoRA or quantised replacements keep working); attention dropout is applied in training when `attn_drop.p > 0`.
    """
    if x.dim() != 4:
        raise ValueError(f"outlook attention expects x [B, H, W, C], got shape {tuple(x.shape)}")
    v = module.v(x)
    logits = module.attn(module.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    drop = module.attn_drop
    dropout_p = float(drop.p) if module.training and isinstance(drop, nn.Dropout) else 0.0
    out = outlook_attention(
        logits, v, module.kernel_size, module.padding, module.stride, module.scale, dropout_p=dropout_p
    )
    return module.proj_drop(module.proj(out))


class OutlookAttention(nn.Module):
    """VOLO outlook attention on x [B, H, W, C] -> [B, H, W, C], interchangeable with timm's module."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = head_dim**-0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn = nn.Linear(dim, kernel_size**4 * num_heads, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_outlook_forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, padding={self.padding}, stride={self.stride}"
        )
