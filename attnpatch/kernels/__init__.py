"""Compute layer: pure tensor functions (Triton on CUDA, PyTorch elsewhere). Never imports transformers.

`kernel_options(...)` sets the kernels' switches for the current thread (see `options`); importing this package
imports no Triton.
"""

from .options import KernelOptions, Tiles, current_kernel_options, kernel_options

__all__ = ["KernelOptions", "Tiles", "current_kernel_options", "kernel_options"]
