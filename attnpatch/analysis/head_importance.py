"""Head importance by pruning: remove one attention head at a time (gate 0 on its output, no weight change) and
measure what the model loses on a dataset (Li et al., TVCG 2023; Michel et al., NeurIPS 2019).

Metrics per (layer, head), over scored items (examples for classification, next-token predictions for language
models): accuracy drop, drop in the probability of the true class (next token), flip rate (predictions that change),
and the first-order Taylor score mean_x |d loss_x / d gate| at gate 1 (Michel et al. eq. 4; one backward pass), with
its variant |d mean_x loss_x / d gate| (`taylor_sum`, signed gradients summed before the absolute value).
Several heads are removed per forward: the batch is repeated and every copy has a different head gated off.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import patched, runs_unpatched
from ..methods.validators import check_head, check_layer

TASKS = ("classification", "next-token")
METRICS = ("accuracy_drop", "prob_drop", "flip_rate", "taylor", "taylor_sum")


@dataclass
class HeadImportance:
    """Importance of every (layer, head); tensors [L, H] (H: the largest head count, missing heads 0)."""

    layers: list[int]
    num_heads: list[int]
    task: str
    examples: int
    items: int
    baseline_accuracy: float
    baseline_prob: float
    accuracy_drop: torch.Tensor
    prob_drop: torch.Tensor
    flip_rate: torch.Tensor
    taylor: torch.Tensor | None = None
    taylor_sum: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def metric(self, name: str) -> torch.Tensor:
        if name not in METRICS or getattr(self, name) is None:
            available = [m for m in METRICS if getattr(self, m) is not None]
            raise ValueError(f"unknown or uncomputed metric {name!r}; available: {available}")
        return getattr(self, name)

    def ranking(self, metric: str = "accuracy_drop", top: int | None = None) -> list[dict[str, Any]]:
        """Heads from most to least important by `metric`: [{"layer", "head", "value"}, ...]."""
        values = self.metric(metric)
        rows = [
            {"layer": layer, "head": h, "value": float(values[i, h])}
            for i, (layer, n) in enumerate(zip(self.layers, self.num_heads, strict=True))
            for h in range(n)
        ]
        rows.sort(key=lambda r: -r["value"])
        return rows[:top] if top is not None else rows

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "examples": self.examples,
            "items": self.items,
            "layers": self.layers,
            "num_heads": self.num_heads,
            "baseline_accuracy": self.baseline_accuracy,
            "baseline_prob": self.baseline_prob,
            "seconds": self.seconds,
        }
        for name in METRICS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).tolist()
                out[f"top_{name}"] = self.ranking(name, top)
        return out


def _repeat(inputs: Mapping[str, Any], copies: int) -> dict[str, Any]:
    return {k: v.repeat(copies, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for k, v in inputs.items()}


class _Scorer:
    """Forward a batch and return per-item logits [B, n, C], targets [B, n] and validity [B, n]."""

    def __init__(self, model: nn.Module, task: str, score_last: int | None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.model, self.task, self.score_last = model, task, score_last
        self.device = next(model.parameters()).device

    def split(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
        if self.task == "classification":
            if "labels" not in batch:
                raise ValueError("classification batches need 'labels' [B] beside the model inputs")
            return inputs, torch.as_tensor(batch["labels"]).to(self.device)
        if "input_ids" not in inputs:
            raise ValueError("next-token batches need 'input_ids' [B, T]")
        return inputs, None

    def __call__(self, inputs: dict[str, Any], labels: torch.Tensor | None):
        if self.task == "classification":
            logits = _upcast(self.model(**inputs).logits)
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < logits.shape[-1]:
                raise ValueError(
                    f"labels range {int(labels.min())}..{int(labels.max())} but the model scores {logits.shape[-1]} "
                    "classes"
                )
            return logits[:, None], labels[:, None], torch.ones_like(labels[:, None], dtype=torch.bool)
        ids = inputs["input_ids"]
        t = ids.shape[1]
        n = t - 1 if self.score_last is None else min(self.score_last, t - 1)
        logits = _upcast(self.model(**inputs, logits_to_keep=n + 1).logits[:, :-1])
        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids[:, t - n :], dtype=torch.bool)
        if mask is not None:
            valid = mask[:, t - n - 1 : t - 1].bool() & mask[:, t - n :].bool()
        return logits, ids[:, t - n :], valid


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 prediction and probability of the target per item."""
    logp = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    return logits.argmax(-1), logp.exp()


def _head_list(num_heads: list[int], heads: Mapping[int, Iterable[int]] | None) -> list[tuple[int, int]]:
    if heads is None:
        return [(layer, h) for layer, n in enumerate(num_heads) for h in range(n)]
    out = []
    for layer, hs in heads.items():
        layer = check_layer("heads", layer, len(num_heads))
        out.extend((layer, check_head("heads", layer, h, num_heads[layer])) for h in hs)
    out.sort()
    return out


@runs_unpatched
def head_importance(
    model: nn.Module,
    data: Iterable[Mapping[str, Any]],
    *,
    task: str = "classification",
    heads: Mapping[int, Iterable[int]] | None = None,
    max_batch: int = 256,
    heads_per_forward: int | None = None,
    taylor: bool = True,
    score_last: int | None = None,
) -> HeadImportance:
    """Importance of each (layer, head) of `model` (eval mode) over `data`, an iterable of batches.

    task "classification": batches are model inputs plus "labels" [B] (e.g. {"pixel_values", "labels"}); the
    model returns logits [B, C]. task "next-token": batches are {"input_ids", "attention_mask"?} of a causal LM;
    the last `score_last` predictions of each row (default all) are scored. heads: {layer: [heads]} to evaluate
    (default every head). Each forward holds at most `max_batch` rows: the batch repeated once per removed head
    (`heads_per_forward` overrides the count; 1 removes one head per forward with [H] gates).
    """
    if model.training:
        raise RuntimeError("head_importance needs model.eval() (dropout would make the metrics noise)")
    scorer = _Scorer(model, task, score_last)
    totals: dict[str, Any] = {}
    timings = {"baseline": 0.0, "masked": 0.0, "taylor": 0.0}
    with patched(model, "head_mask") as patch:
        num_heads = patch.integration.num_heads
        pairs = _head_list(num_heads, heads)
        shape = (len(num_heads), max(num_heads))
        sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("correct", "prob", "flip", "taylor", "signed")}
        base = {"correct": 0.0, "prob": 0.0, "items": 0, "examples": 0}
        for batch in data:
            inputs, labels = scorer.split(batch)
            b = next(v.shape[0] for v in inputs.values() if torch.is_tensor(v))
            start = time.perf_counter()
            patch.method.set_gates(None)
            with torch.no_grad():
                logits, targets, valid = scorer(inputs, labels)
                pred0, prob0 = _stats(logits, targets)
            base["correct"] += float(((pred0 == targets) & valid).sum())
            base["prob"] += float((prob0 * valid).sum())
            base["items"] += int(valid.sum())
            base["examples"] += b
            timings["baseline"] += time.perf_counter() - start
            start = time.perf_counter()
            per_forward = heads_per_forward or max(1, max_batch // b)
            for c0 in range(0, len(pairs), per_forward):
                _masked_forward(patch, scorer, inputs, labels, pairs[c0 : c0 + per_forward], pred0, valid, sums)
            timings["masked"] += time.perf_counter() - start
            if taylor:
                start = time.perf_counter()
                _taylor(patch, scorer, inputs, labels, num_heads, sums["taylor"], sums["signed"])
                timings["taylor"] += time.perf_counter() - start
        patch.method.set_gates(None)
    if base["items"] == 0:
        raise ValueError("no item was scored: data is empty (or every target is padding)")
    items = base["items"]
    totals = {
        "accuracy_drop": ((base["correct"] - sums["correct"]) / items).float(),
        "prob_drop": ((base["prob"] - sums["prob"]) / items).float(),
        "flip_rate": (sums["flip"] / items).float(),
    }
    evaluated = torch.zeros(shape, dtype=torch.bool)
    for layer, h in pairs:
        evaluated[layer, h] = True
    totals = {k: v * evaluated for k, v in totals.items()}
    return HeadImportance(
        layers=list(range(len(num_heads))), num_heads=list(num_heads), task=task, examples=base["examples"],
        items=items, baseline_accuracy=base["correct"] / items, baseline_prob=base["prob"] / items,
        taylor=(sums["taylor"] / base["examples"]).float() * evaluated if taylor else None,
        taylor_sum=(sums["signed"].abs() / base["examples"]).float() * evaluated if taylor else None,
        seconds=timings, **totals,
    )  # fmt: skip


def _masked_forward(patch, scorer, inputs, labels, chunk, pred0, valid, sums) -> None:
    """One forward with head chunk[c] removed in copy c of the batch; adds each head's sums."""
    copies = len(chunk)
    b = pred0.shape[0]
    num_heads = patch.integration.num_heads
    gates: dict[int, torch.Tensor] = {}
    if copies == 1:
        layer, h = chunk[0]
        gates[layer] = torch.ones(num_heads[layer])
        gates[layer][h] = 0.0
    else:
        for c, (layer, h) in enumerate(chunk):
            gate = gates.setdefault(layer, torch.ones(copies * b, num_heads[layer]))
            gate[c * b : (c + 1) * b, h] = 0.0
    patch.method.set_gates(gates)
    with torch.no_grad():
        reps = None if labels is None else labels.repeat(copies)
        logits, targets, _ = scorer(_repeat(inputs, copies), reps)
        pred, prob = _stats(logits, targets)
    pred, prob = pred.reshape(copies, *pred0.shape), prob.reshape(copies, *pred0.shape)
    targets = targets.reshape(copies, *pred0.shape)
    for c, (layer, h) in enumerate(chunk):
        sums["correct"][layer, h] += float(((pred[c] == targets[c]) & valid).sum())
        sums["prob"][layer, h] += float((prob[c] * valid).sum())
        sums["flip"][layer, h] += float(((pred[c] != pred0) & valid).sum())


def _taylor(patch, scorer, inputs, labels, num_heads, out: torch.Tensor, signed: torch.Tensor) -> None:
    """Adds sum_x |d loss_x / d gate[x, l, h]| to `out` and sum_x d loss_x / d gate[x, l, h] to `signed`, at gates 1
    (loss_x: mean cross-entropy over x's scored items)."""
    b = next(v.shape[0] for v in inputs.values() if torch.is_tensor(v))
    gates = {layer: torch.ones(b, n, requires_grad=True) for layer, n in enumerate(num_heads)}
    patch.method.set_gates(gates)
    with torch.enable_grad():
        logits, targets, valid = scorer(inputs, labels)
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None])[..., 0]
        per_example = (nll * valid).sum(-1) / valid.sum(-1).clamp_min(1)
        grads = torch.autograd.grad(per_example.sum(), [gates[layer] for layer in range(len(num_heads))])
    for layer, grad in enumerate(grads):
        out[layer, : num_heads[layer]] += grad.abs().sum(0).double()
        signed[layer, : num_heads[layer]] += grad.sum(0).double()
    patch.method.set_gates(None)
