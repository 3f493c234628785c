"""Triton kernels (imported only when Triton runs an op). Each launcher takes torch tensors with any strides."""
