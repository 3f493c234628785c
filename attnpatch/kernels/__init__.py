"""Compute layer: pure tensor functions (Triton on CUDA, PyTorch elsewhere). Never imports transformers."""
