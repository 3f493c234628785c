"""Attention adversarial training, AT and iAT (Kitada & Iyatomi, IEEE Access 2021), on a transformer's patched
self-attention: the adversarial perturbation is added to the pre-softmax scores of the chosen layers.

One training step (`AttentionAT.loss`; the README's "Training adapters" section):
1. clean forward -> L_clean (iAT also records each layer's clean logits);
2. forward with a zero perturbation that requires grad -> L1; g = dL1/dS by `torch.autograd.grad` on the
   perturbation only, so no parameter gradient from this pass reaches the update (the released code's leak);
3. direction r: AT, normalize(g); iAT, the paper's difference-restricted direction (below);
4. forward with xi * r (a constant) -> L_adv; return L_clean + lam * L_adv.

iAT (paper, after Sato et al.'s iAdvT): for example b, the directions are the differences of the clean logits of the
other examples in the batch, d_bj = (a_j - a_b) / ||a_j - a_b|| over the entries both see; the weights are the
normalised loss gradient along them, w_bj = <g_b, d_bj> / ||<g_b, d_b.>||; r_b = sum_j w_bj d_bj. The released code
instead uses normalize(-g) (its difference construction does not reach the gradient); `match_released_code=True`
reproduces it, and also the leak: the update then follows 2 grad L_clean + lam grad L_adv, as the authors' trainer.

Normalisation `norm`: "row" makes every (layer, head, query) row of r unit-L2 over its visible keys (each attention
distribution gets its own xi-ball, as the paper's single distribution does); "example" makes each example's whole
perturbation (all chosen layers) unit-L2.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..methods.adapter import AdapterAttention
from .base import AttentionAdapterBase

MODES = ("at", "iat")
NORMS = ("row", "example")


@dataclass(frozen=True)
class AttentionATConfig:
    """mode "at" | "iat"; xi: perturbation norm; lam: weight of the adversarial loss; norm "row" | "example";
    layers: self-attention layers perturbed (None: all); match_released_code: the authors' code (see module doc)."""

    mode: str = "at"
    xi: float = 1.0
    lam: float = 1.0
    norm: str = "row"
    layers: Sequence[int] | None = None
    match_released_code: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        for name in ("xi", "lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.match_released_code, bool):
            raise ValueError(f"match_released_code must be True or False, got {self.match_released_code!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))


@dataclass
class ATLoss:
    """total: what to back-propagate; clean, adversarial: the two task losses (detached); outputs: the clean
    forward's return value."""

    total: torch.Tensor
    clean: torch.Tensor
    adversarial: torch.Tensor
    outputs: Any = None


def _l2_normalize(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    norm = x.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return x / norm.clamp_min(1e-12)


def normalize_perturbation(grads: dict[int, torch.Tensor], norm: str) -> dict[int, torch.Tensor]:
    """Unit-L2 directions: per (layer, b, h, i) row over keys ("row") or per example over every layer ("example")."""
    if norm == "row":
        return {layer: _l2_normalize(g, (-1,)) for layer, g in grads.items()}
    total = sum(g.pow(2).flatten(1).sum(1) for g in grads.values())
    scale = total.sqrt().clamp_min(1e-12)
    return {layer: g / scale.view(-1, 1, 1, 1) for layer, g in grads.items()}


def iat_direction(
    grads: dict[int, torch.Tensor], logits: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> dict[int, torch.Tensor]:
    """The paper's iAT direction (not normalised): r_b = sum_j w_bj d_bj over the batch's other examples.

    grads[layer], logits[layer][0]: [B, H, Lq, Lk]; logits[layer][1]: visibility. Loops over j, so memory stays
    O(B * H * Lq * Lk) per layer.
    """
    layers = sorted(grads)
    batch = grads[layers[0]].shape[0]
    if batch < 2:
        raise ValueError("iAT needs at least 2 examples per batch (its directions are differences between examples)")
    dtype = torch.promote_types(grads[layers[0]].dtype, torch.float32)
    vis = {layer: logits[layer][1].expand_as(grads[layer]).to(dtype) for layer in layers}
    clean = {layer: logits[layer][0].to(dtype) for layer in layers}

    def difference(layer: int, j: int) -> torch.Tensor:
        """(a_j - a_b) on the entries both b and j see, for every b: [B, H, Lq, Lk]."""
        both = vis[layer] * vis[layer][j : j + 1]
        return (clean[layer][j : j + 1] - clean[layer]) * both

    norms = torch.zeros(batch, batch, device=grads[layers[0]].device, dtype=dtype)
    dots = torch.zeros_like(norms)
    for j in range(batch):
        for layer in layers:
            diff = difference(layer, j)
            norms[:, j] += diff.pow(2).flatten(1).sum(1)
            dots[:, j] += (grads[layer].to(dtype) * diff).flatten(1).sum(1)
    norms = norms.sqrt()
    coef = torch.where(norms > 0, dots / norms.clamp_min(1e-12), torch.zeros_like(dots))  # <g_b, d_bj>
    weight = coef / coef.norm(dim=1, keepdim=True).clamp_min(1e-12)
    weight = torch.where(norms > 0, weight / norms.clamp_min(1e-12), torch.zeros_like(weight))  # w_bj / ||a_j - a_b||
    out = {layer: torch.zeros_like(grads[layer], dtype=dtype) for layer in layers}
    for j in range(batch):
        for layer in layers:
            out[layer] += weight[:, j].view(-1, 1, 1, 1) * difference(layer, j)
    return out


class AttentionAT(AttentionAdapterBase):
    """Adversarial training on the attention logits of `model` (a transformers model, PEFT-wrapped or not).

    at = AttentionAT(encoder, mode="iat", xi=1.0)
    result = at.loss(lambda: loss_fn(model(batch)))   # a closure that runs the forward and returns the task loss
    result.total.backward()
    """

    kind = "attention_at"
    config_class = AttentionATConfig

    def __init__(self, model: torch.nn.Module, config: AttentionATConfig | None = None, **options: Any):
        if config is None:
            config = AttentionATConfig(**options)
        elif options:
            raise TypeError("pass either config= or keyword options, not both")
        super().__init__(model, config, layers=config.layers)

    def loss(self, forward: Callable[[], Any], loss_of: Callable[[Any], torch.Tensor] | None = None) -> ATLoss:
        """One adversarial step. `forward()` runs the model; `loss_of(output)` (default: the output itself, or its
        `.loss`) gives the scalar task loss."""
        loss_of = loss_of or _default_loss
        method: AdapterAttention = self.method
        cfg = self.config
        iat_paper = cfg.mode == "iat" and not cfg.match_released_code
        if iat_paper:
            with method.recording_logits() as clean_logits:
                outputs = forward()
        else:
            outputs = forward()
        clean = loss_of(outputs)
        with method.perturbation_leaves() as leaves:
            first = loss_of(forward())
        layers = sorted(leaves)
        if not layers:
            raise RuntimeError("the forward reached none of the adapter's layers; is `forward` running this model?")
        grads = torch.autograd.grad(first, [leaves[x] for x in layers], retain_graph=cfg.match_released_code)
        grads = dict(zip(layers, grads, strict=True))
        if cfg.mode == "at":
            direction = grads
        elif cfg.match_released_code:
            direction = {layer: -g for layer, g in grads.items()}
        else:
            direction = iat_direction(grads, clean_logits)
        direction = normalize_perturbation(direction, cfg.norm)
        with method.perturbed({layer: (cfg.xi * d).detach() for layer, d in direction.items()}):
            adversarial = loss_of(forward())
        total = clean + cfg.lam * adversarial
        if cfg.match_released_code:
            total = total + (first - first.detach())  # the released trainer's extra grad L1 (= grad L_clean)
        return ATLoss(total=total, clean=clean.detach(), adversarial=adversarial.detach(), outputs=outputs)


def _default_loss(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, dict):
        loss = outputs.get("loss")
    if loss is None:
        raise ValueError("the forward returned no loss: pass labels to the model, or give loss_of=...")
    return loss
