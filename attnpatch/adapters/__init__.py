"""Training-time adapters on patched attention: adversarial attention training (AT/iAT), progressive
self-supervised attention (PSS) and intention conditioning. They ride on the `adapter` method
(`attention.AdapterAttention`): differentiable attention with perturbations, probes and key biases."""

from .adversarial import ATLoss, AttentionAT, AttentionATConfig
from .attention import AdapterAttention, AdapterConfig, Probe

__all__ = ["ATLoss", "AdapterAttention", "AdapterConfig", "AttentionAT", "AttentionATConfig", "Probe"]
