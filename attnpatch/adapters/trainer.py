"""`transformers.Trainer` with attention adversarial training: its `compute_loss` runs `AttentionAT.loss`."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from .adversarial import AttentionAT


class AttentionATTrainer(Trainer):
    """Trainer(model, args, ..., attention_at=AttentionAT(model, mode="iat", xi=1.0)): training steps back-propagate
    L_clean + lam * L_adv; evaluation is unchanged. The model must return `.loss` (give it labels)."""

    def __init__(self, *args: Any, attention_at: AttentionAT, **kwargs: Any):
        if not isinstance(attention_at, AttentionAT):
            raise TypeError(f"attention_at must be an AttentionAT, got {type(attention_at).__name__}")
        super().__init__(*args, **kwargs)
        self.attention_at = attention_at

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        result = self.attention_at.loss(lambda: model(**inputs))
        return (result.total, result.outputs) if return_outputs else result.total
