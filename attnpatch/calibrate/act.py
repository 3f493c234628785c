"""ACT head selection: score ACT on each single (layer, head) on calibration items and keep the heads that help.

Score of a configuration on an item: the log-probability of the correct option under a softmax over the options'
length-normalised log-likelihoods (the same normalisation the evaluation uses), so a head that shifts probability
toward the right answer counts even when the argmax does not flip. Selection rule (documented in the README):

1. per candidate, the paired per-item differences d_i = score_i(candidate) - score_i(baseline);
2. keep candidates with mean(d) > min_z * stderr(d) and no loss of calibration accuracy;
3. rank the kept ones by mean(d) / stderr(d), cap at `max_heads`;
4. apply the top-k together for k = n, n/2, n/4, ..., 1 and keep the k whose combination scores best, provided it
   beats the baseline (otherwise the profile selects no head).

Work is reused: layers below the candidate's layer are run once per layer and replayed (see replay.py), so a
candidate costs a forward from its own layer up. Results are appended to an optional JSONL checkpoint, and a rerun
with the same model, items and options skips the candidates already there. Under `accelerate launch` the items are
sharded across processes and the per-item scores gathered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..api import patched, runs_unpatched
from ..distributed import Processes
from ..eval.metrics import continuation_length
from ..eval.scoring import BatchedRows
from ..eval.tasks import Item, load_task
from ..integrations.transformers import TransformersIntegration
from ..methods.act import ACTConfig
from ..methods.validators import resolve_heads
from ..profiles import Profile, fingerprint
from .replay import Replay

logger = logging.getLogger("attnpatch")


@dataclass
class Scores:
    """Per-item results of one configuration on the calibration items (all processes, item order)."""

    score: list[float]  # log-probability of the correct option among the options
    correct: list[bool]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))

    @property
    def mean(self) -> float:
        return sum(self.score) / max(1, len(self.score))


@dataclass
class HeadResult:
    layer: int
    head: int
    delta: float  # mean paired score difference vs the baseline
    stderr: float
    delta_accuracy: float
    seconds: float

    @property
    def z(self) -> float:
        return self.delta / self.stderr if self.stderr > 0 else (math.inf if self.delta > 0 else 0.0)


def _item_score(logprobs: Sequence[float], item: Item) -> tuple[float, bool]:
    """Log-probability of the right option under a softmax over per-character scores, and whether acc_norm is right
    (the per-character score is lm-eval's acc_norm: the option's length without its leading space)."""
    normalised = torch.tensor([lp / continuation_length(o) for lp, o in zip(logprobs, item.options, strict=True)])
    log_choice = torch.log_softmax(normalised.double(), dim=0)
    return float(log_choice[item.label]), int(normalised.argmax()) == item.label


class _Runner:
    """Scores the local shard of items under a context, batch by batch, and gathers the results."""

    def __init__(self, model, tokenizer, items: list[Item], batch_size: int, processes: Processes):
        self.processes = processes
        self.indices = processes.shard(len(items))
        self.rows = BatchedRows(model, tokenizer, [items[i] for i in self.indices], batch_size)

    def run(self, context: Callable[[int], contextlib.AbstractContextManager] | None = None) -> Scores:
        logprobs = self.rows.logprobs(context)
        items = self.rows.items
        local = [(i, *_item_score(lp, item)) for i, lp, item in zip(self.indices, logprobs, items, strict=True)]
        merged = sorted(self.processes.gather(local))
        return Scores(score=[s for _, s, _ in merged], correct=[c for _, _, c in merged])

    def capture(self, replay: Replay, start: int, cache: list, layer: int) -> list:
        """Inputs of decoder layer `layer` for every batch, computed from `cache` (inputs of layer `start`)."""
        out: list = []
        with torch.inference_mode():
            for b, batch in enumerate(self.rows.batches):
                store: list = []
                with replay.start_at(start, cache[b] if cache else None), replay.capture_input(layer, store):
                    self.rows.forward(batch)
                out.append(store[0])
        return out


def _paired(candidate: Scores, baseline: Scores, layer: int, head: int, seconds: float) -> HeadResult:
    d = torch.tensor(candidate.score, dtype=torch.float64) - torch.tensor(baseline.score, dtype=torch.float64)
    stderr = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return HeadResult(layer, head, float(d.mean()), stderr, candidate.accuracy - baseline.accuracy, seconds)


class _Checkpoint:
    """Append-only JSONL of finished candidates, valid only for the same key (model, items, options)."""

    def __init__(self, path: str | None, key: str, writer: bool):
        self.path, self.key, self.writer = path, key, writer
        self.done: dict[tuple[int, int], dict] = {}
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if lines and lines[0].get("key") == key:
                self.done = {(r["layer"], r["head"]): r for r in lines[1:]}
            elif lines:
                logger.warning("attnpatch calibrate: %s belongs to another run; starting afresh", path)
                if writer:
                    os.remove(path)
        if path and writer and not os.path.isfile(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"key": key}) + "\n")

    def add(self, layer: int, head: int, scores: Scores, seconds: float) -> None:
        record = {"layer": layer, "head": head, "score": scores.score, "correct": scores.correct, "seconds": seconds}
        self.done[(layer, head)] = record
        if self.path and self.writer:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _candidates(spec: Any, integration: TransformersIntegration) -> dict[int, list[int]]:
    layers = integration.num_layers
    return resolve_heads(spec, layers, integration.num_heads, range(2, max(2, layers - 1)))


def calibration_items(tasks: Sequence[str], *, shots: int, limit: int | None, seed: int) -> list[Item]:
    """The calibration part of each task (disjoint from the evaluated part), concatenated in task order."""
    items: list[Item] = []
    for name in tasks:
        items += load_task(name, part="calibration", shots=shots, limit=limit, seed=seed)
    return items


@runs_unpatched
def calibrate_act(
    model,
    tokenizer,
    tasks: Sequence[str] | Sequence[Item],
    *,
    beta: float = 0.4,
    threshold: float = 0.1,
    min_visible_rows: int = 1,
    keep_first_sink: bool = True,
    candidates: Any = None,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 0,
    min_z: float = 1.0,
    max_heads: int | None = None,
    screen_layers: int | None = None,
    batch_size: int = 16,
    checkpoint: str | None = None,
    progress: bool = True,
) -> Profile:
    """Select the heads where ACT helps (see the module docstring for the rule) and return them as a Profile.

    tasks: task names (their calibration part is used: `limit` items each, `shots` demonstrations) or Items.
    candidates: None (every head of layers 2..L-2), "all", or {layer: [heads] | "all"}.
    screen_layers: first score ACT on all candidate heads of each layer at once, then score single heads only in
    the best `screen_layers` layers that helped (for models with many heads; the default scores every head).
    checkpoint: a JSONL path for resumable partial results.
    """
    options = dict(beta=beta, threshold=threshold, min_visible_rows=min_visible_rows, keep_first_sink=keep_first_sink)
    ACTConfig(**options)  # validate before the long run
    names = [t for t in tasks if isinstance(t, str)]
    items = calibration_items(names, shots=shots, limit=limit, seed=seed) if names else list(tasks)
    if not items:
        raise ValueError("calibrate needs at least one calibration item")
    integration = TransformersIntegration(model)
    todo = _candidates(candidates, integration)
    processes = Processes()
    runner = _Runner(model, tokenizer, items, batch_size, processes)
    replay = Replay(model)
    print_ = fingerprint(model)
    key = hashlib.sha256(
        json.dumps([print_["weights"], [i.id for i in items], [i.context[-64:] for i in items], options]).encode()
    ).hexdigest()[:16]
    saved = _Checkpoint(checkpoint, key, writer=processes.rank == 0)
    started = time.perf_counter()

    baseline = runner.run()
    baseline_seconds = time.perf_counter() - started
    state = dict(resumed=0, capture=0.0, resumed_seconds=0.0)

    def sweep(units: dict[int, list[tuple[int, list[int]]]], desc: str) -> list[HeadResult]:
        """Score each unit (layer, key, heads) with ACT on those heads; key -1 stands for a whole layer."""
        found: list[HeadResult] = []
        cache: list = []
        cached_layer = 0
        total = sum(len(u) for u in units.values())
        with tqdm(total=total, desc=desc, unit="cand", disable=not progress or processes.rank) as bar:
            for layer in sorted(units):
                if any((layer, key) not in saved.done for key, _ in units[layer]) and layer > 0:
                    t0 = time.perf_counter()
                    cache = runner.capture(replay, cached_layer, cache, layer)
                    cached_layer = layer
                    state["capture"] += time.perf_counter() - t0
                for key, heads in units[layer]:
                    record = saved.done.get((layer, key))
                    if record is None:
                        t0 = time.perf_counter()
                        with patched(model, "act", heads={layer: heads}, **options):
                            scores = runner.run(_replayed(replay, layer, cache))
                        seconds = time.perf_counter() - t0
                        saved.add(layer, key, scores, seconds)
                    else:
                        scores, seconds = Scores(record["score"], record["correct"]), record["seconds"]
                        state["resumed"] += 1
                        state["resumed_seconds"] += seconds
                    found.append(_paired(scores, baseline, layer, key, seconds))
                    bar.update(1)
        return found

    layer_results: list[HeadResult] = []
    if screen_layers is not None:
        layer_results = sweep({layer: [(-1, heads)] for layer, heads in todo.items()}, "screening layers")
        ranked = sorted(layer_results, key=lambda r: r.z, reverse=True)
        keep = {r.layer for r in ranked[:screen_layers] if r.delta > 0}
        todo = {layer: heads for layer, heads in todo.items() if layer in keep}
    results = sweep({layer: [(h, [h]) for h in heads] for layer, heads in todo.items()}, "calibrating heads")
    resumed, capture_seconds = state["resumed"], state["capture"]
    chosen, combination = _select(results, min_z=min_z, max_heads=max_heads)
    heads, combined = _best_combination(model, runner, baseline, chosen, options)
    if not heads:
        logger.warning("attnpatch calibrate: no head combination beat the baseline; the profile selects no head")
    total = time.perf_counter() - started  # this run's wall time; `resumed` adds the checkpointed candidates' own
    return _profile(
        model, options, heads, baseline, results, combined, combination,
        meta=dict(
            tasks=names or sorted({i.id.split("/")[0] for i in items}), items=len(items), shots=shots, seed=seed,
            min_z=min_z, max_heads=max_heads, processes=processes.world, resumed=resumed,
            screen_layers=screen_layers,
            layer_screen=[dict(layer=r.layer, delta=r.delta, stderr=r.stderr, delta_accuracy=r.delta_accuracy)
                          for r in layer_results],
            seconds=dict(
                total=total, resumed=state["resumed_seconds"], compute=total + state["resumed_seconds"],
                baseline=baseline_seconds, capture=capture_seconds,
                per_candidate=sum(r.seconds for r in results) / max(1, len(results)), candidates=len(results),
                screening=sum(r.seconds for r in layer_results),
            ),
        ),
    )  # fmt: skip


def _replayed(replay: Replay, layer: int, cache: list) -> Callable[[int], contextlib.AbstractContextManager]:
    """Context per batch: run from `layer` on the cached inputs (a plain forward when nothing is cached)."""
    return lambda b: replay.start_at(layer, cache[b] if cache else None)


def _select(results: list[HeadResult], *, min_z: float, max_heads: int | None) -> tuple[list[HeadResult], str]:
    kept = [r for r in results if r.delta > 0 and r.z > min_z and r.delta_accuracy >= 0]
    kept.sort(key=lambda r: r.z, reverse=True)
    if max_heads is not None:
        kept = kept[:max_heads]
    rule = f"mean paired gain > {min_z} x stderr and no accuracy loss, ranked by gain / stderr"
    return kept, rule


def _best_combination(model, runner: _Runner, baseline: Scores, chosen: list[HeadResult], options):
    """The top-k prefix of `chosen` (k halving from all) whose joint application scores best above the baseline."""
    best: tuple[dict[int, list[int]], Scores | None] = ({}, None)
    best_mean = baseline.mean
    k = len(chosen)
    tried = set()
    while k >= 1:
        if k not in tried:
            tried.add(k)
            heads: dict[int, list[int]] = {}
            for r in chosen[:k]:
                heads.setdefault(r.layer, []).append(r.head)
            with patched(model, "act", heads=heads, **options):
                scores = runner.run()
            if scores.mean > best_mean:
                best, best_mean = ({layer: sorted(h) for layer, h in heads.items()}, scores), scores.mean
        k //= 2
    return best


def _profile(model, options, heads, baseline, results, combined, rule, meta) -> Profile:
    integration = TransformersIntegration(model)
    width = max(integration.num_heads)
    table = {name: torch.full((integration.num_layers, width), float("nan")) for name in ("delta", "stderr", "dacc")}
    for r in results:
        table["delta"][r.layer, r.head] = r.delta
        table["stderr"][r.layer, r.head] = r.stderr
        table["dacc"][r.layer, r.head] = r.delta_accuracy
    metadata = dict(
        meta,
        rule=rule,
        baseline=dict(accuracy=baseline.accuracy, score=baseline.mean),
        calibrated=None if combined is None else dict(accuracy=combined.accuracy, score=combined.mean),
        selected=sum(len(h) for h in heads.values()),
        candidates=[
            dict(layer=r.layer, head=r.head, delta=r.delta, stderr=r.stderr, delta_accuracy=r.delta_accuracy)
            for r in results
        ],
    )
    return Profile(
        method="act",
        options=options,
        heads=heads,
        fingerprint=fingerprint(model),
        metadata=metadata,
        tensors={f"per_head_{k}": v for k, v in table.items()},
    )
