"""Training-time adapters on patched attention: adversarial attention training (AT/iAT), progressive
self-supervised attention (PSS), intention conditioning and foresight training (Merlin FPT/FIT, `adapters.foresight`).
They ride on the `adapter` method (`attention.AdapterAttention`): differentiable attention with perturbations, probes
and key biases."""

from ..methods.adapter import AdapterAttention, AdapterConfig, Probe
from .adversarial import ATLoss, AttentionAT, AttentionATConfig
from .foresight import ForesightAdapter, ForesightConfig
from .intention import IntentionConditioner, IntentionConfig
from .pss import AspectAttentionHead, MinedWords, PSSConfig, PSSProbe, progressive_mining, pss_loss

__all__ = [
    "ATLoss",
    "AdapterAttention",
    "AdapterConfig",
    "AspectAttentionHead",
    "AttentionAT",
    "AttentionATConfig",
    "ForesightAdapter",
    "ForesightConfig",
    "IntentionConditioner",
    "IntentionConfig",
    "MinedWords",
    "PSSConfig",
    "PSSProbe",
    "Probe",
    "progressive_mining",
    "pss_loss",
]
