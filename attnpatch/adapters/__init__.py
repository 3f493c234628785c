"""Training-time adapters on patched attention: adversarial attention training (AT/iAT), progressive
self-supervised attention (PSS) and intention conditioning. They ride on the `adapter` method
(`attention.AdapterAttention`): differentiable attention with perturbations, probes and key biases."""

from ..methods.adapter import AdapterAttention, AdapterConfig, Probe
from .adversarial import ATLoss, AttentionAT, AttentionATConfig
from .intention import IntentionConditioner, IntentionConfig
from .pss import AspectAttentionHead, MinedWords, PSSConfig, PSSProbe, progressive_mining, pss_loss

__all__ = [
    "ATLoss",
    "AdapterAttention",
    "AdapterConfig",
    "AspectAttentionHead",
    "AttentionAT",
    "AttentionATConfig",
    "IntentionConditioner",
    "IntentionConfig",
    "MinedWords",
    "PSSConfig",
    "PSSProbe",
    "Probe",
    "progressive_mining",
    "pss_loss",
]
