"""Where a model's attention sinks are: ACT's column statistic for every (layer, head), without changing outputs.

`sinks(model, inputs)` runs one forward pass with a neutral ACT patch (beta=1, so every output is unchanged) and
returns a `SinkAnalysis`: per (layer, head, sequence, key position) the mean attention the key receives from the
query rows that see it (ACT's statistic), how many rows see it, and which keys are sinks, first or hidden.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import patched, runs_unpatched
from ..integrations.transformers import TransformersIntegration

# Token classes, in the order the rule tries them (see `classify_tokens`).
TOKEN_CLASSES = ("pad", "bos", "last-tokens", "newline", "punctuation", "other")
SINK_CLASSES = TOKEN_CLASSES[1:]  # pads are never sinks
DEFAULT_TAIL_ROWS = 4  # keys seen by at most this many query rows are "last-tokens" (the statistic is noisy there)


@dataclass(frozen=True)
class SinkReport:
    """One detected sink: a key whose mean attention over the rows that see it exceeds the threshold."""

    layer: int
    head: int
    batch: int
    position: int
    column_mean: float
    rows: int  # query rows that saw the key
    first: bool  # the first sink of its sequence (ACT keeps it)


@dataclass(repr=False, eq=False)
class SinkAnalysis:
    """ACT's sink statistic of one forward pass, per (layer, head, sequence, key position).

    Tensors are indexed [L, H, B, T]: L = the analysed layers (model layer indices in `layers`), H = the largest head
    count among them (a layer with fewer heads has count 0 and mean 0 in the missing ones, which are never sinks;
    `num_heads` gives each layer's count), B = sequences, T = positions of the padded rows. Positions always refer
    to the padded row (left padding shifts them); pad positions have count 0, are never sinks, and their token
    class is "pad". A key is a sink when `column_mean > threshold` and `count >= min_visible_rows`; the first sink
    of each (layer, head, sequence) is its lowest-position sink (the one ACT keeps), the others are hidden sinks.
    """

    layers: list[int]
    num_heads: list[int]
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64, 1 = real token
    column_mean: torch.Tensor  # [L, H, B, T] float32: mean attention over the query rows that see the key
    count: torch.Tensor  # [L, H, B, T] int64: query rows that see the key
    threshold: float
    min_visible_rows: int
    tail_rows: int
    token_classes: list[list[str]]  # [B][T], see `classify_tokens`
    tokens: list[list[str]] | None = None  # [B][T] decoded token texts, when a tokenizer was given
    sinks: torch.Tensor = field(init=False)  # [L, H, B, T] bool
    first: torch.Tensor = field(init=False)  # [L, H, B, T] bool: the lowest-position sink of each (l, h, b)
    hidden: torch.Tensor = field(init=False)  # [L, H, B, T] bool: sinks other than the first

    def __post_init__(self) -> None:
        real = self.attention_mask.bool()[None, None]
        heads = torch.arange(self.column_mean.shape[1])[None, :] < torch.tensor(self.num_heads)[:, None]
        self.sinks = (
            (self.column_mean > self.threshold) & (self.count >= self.min_visible_rows) & real & heads[:, :, None, None]
        )
        lowest = self.sinks.to(torch.uint8).argmax(dim=-1, keepdim=True)
        self.first = torch.zeros_like(self.sinks).scatter(-1, lowest, self.sinks.gather(-1, lowest))
        self.hidden = self.sinks & ~self.first

    def __repr__(self) -> str:
        _, h, b, t = self.column_mean.shape
        return (
            f"SinkAnalysis({len(self.layers)} layers x {h} heads, {b} sequences x {t} positions; "
            f"{int(self.sinks.sum())} sinks ({int(self.first.sum())} first, {int(self.hidden.sum())} hidden), "
            f"threshold={self.threshold}, min_visible_rows={self.min_visible_rows})"
        )

    def layer_map(self, reduce: str = "max") -> torch.Tensor:
        """[L, B, T]: the column mean reduced over each layer's heads ("max" or "mean")."""
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        rows = []
        for i, n in enumerate(self.num_heads):
            values = self.column_mean[i, :n]
            rows.append(values.amax(0) if reduce == "max" else values.mean(0))
        return torch.stack(rows)

    def table(self, *, hidden_only: bool = False) -> list[dict[str, Any]]:
        """One row per sink, sorted by (sequence, layer, head, position): layer (model index), head, sequence,
        position (in the padded row), token_id, token (text or None), token_class, column_mean, count, first,
        hidden."""
        mask = self.hidden if hidden_only else self.sinks
        rows = []
        for li, h, b, t in mask.nonzero().tolist():
            rows.append(
                {
                    "layer": self.layers[li],
                    "head": h,
                    "sequence": b,
                    "position": t,
                    "token_id": int(self.input_ids[b, t]),
                    "token": None if self.tokens is None else self.tokens[b][t],
                    "token_class": self.token_classes[b][t],
                    "column_mean": float(self.column_mean[li, h, b, t]),
                    "count": int(self.count[li, h, b, t]),
                    "first": bool(self.first[li, h, b, t]),
                    "hidden": bool(self.hidden[li, h, b, t]),
                }
            )
        return sorted(rows, key=lambda r: (r["sequence"], r["layer"], r["head"], r["position"]))

    def summary(self) -> dict[str, Any]:
        """Counts: sinks / first_sinks / hidden_sinks ((layer, head, sequence, key) entries); first_by_class and
        hidden_by_class (the same entries by token class); hidden_keys_by_class (distinct (sequence, key) that are a
        hidden sink in at least one head); heads_with_hidden_sinks {layer: heads with a hidden sink in some
        sequence}."""

        def by_class(entries: torch.Tensor) -> dict[str, int]:  # entries [B, T]: a number per key
            out = dict.fromkeys(SINK_CLASSES, 0)
            for b, t in entries.nonzero().tolist():
                out[self.token_classes[b][t]] += int(entries[b, t])
            return out

        hidden_entries = self.hidden.sum(dim=(0, 1))  # [B, T]: (layer, head) pairs where the key is a hidden sink
        heads_hidden = self.hidden.any(dim=(2, 3)).sum(dim=1)
        return {
            "sinks": int(self.sinks.sum()),
            "first_sinks": int(self.first.sum()),
            "hidden_sinks": int(self.hidden.sum()),
            "first_by_class": by_class(self.first.sum(dim=(0, 1))),
            "hidden_by_class": by_class(hidden_entries),
            "hidden_keys_by_class": by_class((hidden_entries > 0).long()),
            "heads_with_hidden_sinks": {layer: int(n) for layer, n in zip(self.layers, heads_hidden, strict=True)},
        }

    def to_dict(self, *, include_stats: bool = True) -> dict[str, Any]:
        """JSON-serialisable form (object keys are strings): settings, inputs, token texts and classes, the sink
        table and summary, and with `include_stats` the full column_mean / count as nested [L][H][B][T] lists
        (needed by `from_dict`)."""
        summary = self.summary()
        summary["heads_with_hidden_sinks"] = {str(k): v for k, v in summary["heads_with_hidden_sinks"].items()}
        out: dict[str, Any] = {
            "threshold": self.threshold,
            "min_visible_rows": self.min_visible_rows,
            "tail_rows": self.tail_rows,
            "layers": list(self.layers),
            "num_heads": list(self.num_heads),
            "input_ids": self.input_ids.tolist(),
            "attention_mask": self.attention_mask.tolist(),
            "tokens": self.tokens,
            "token_classes": self.token_classes,
            "sinks": self.table(),
            "summary": summary,
        }
        if include_stats:
            out["column_mean"] = self.column_mean.tolist()
            out["count"] = self.count.tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SinkAnalysis:
        """Rebuild an analysis from `to_dict()` output (made with include_stats=True)."""
        if "column_mean" not in data:
            raise ValueError("from_dict needs the statistics: save with to_dict(include_stats=True)")
        return cls(
            layers=list(data["layers"]),
            num_heads=list(data["num_heads"]),
            input_ids=torch.tensor(data["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(data["attention_mask"], dtype=torch.long),
            column_mean=torch.tensor(data["column_mean"], dtype=torch.float32),
            count=torch.tensor(data["count"], dtype=torch.long),
            threshold=data["threshold"],
            min_visible_rows=data["min_visible_rows"],
            tail_rows=data["tail_rows"],
            token_classes=[list(row) for row in data["token_classes"]],
            tokens=None if data.get("tokens") is None else [list(row) for row in data["tokens"]],
        )


def _text_class(text: str) -> str:
    """Class of a decoded token: "other" with a letter or digit (or no text at all), else "newline" with a line
    break, else "punctuation" (punctuation, symbols, spaces)."""
    if not text or any(unicodedata.category(c)[0] in "LN" for c in text):
        return "other"
    return "newline" if "\n" in text or "\r" in text else "punctuation"


def classify_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_rows: torch.Tensor,
    *,
    tokens: list[list[str]] | None = None,
    bos_token_id: int | None = None,
    tail_rows: int = DEFAULT_TAIL_ROWS,
) -> list[list[str]]:
    """[B][T] token classes; the first rule that matches wins:

    "pad": attention_mask is 0. "bos": the first real token of the sequence, or the tokenizer's bos id.
    "last-tokens": the key is seen by at most `tail_rows` query rows in every analysed layer (`max_rows`, the
    largest count over layers and heads; in a causal model: the last `tail_rows` real tokens, where the column mean
    rests on a handful of rows). With token texts: "other" if the text has a letter or digit (or is empty),
    "newline" if it has a line break, else "punctuation" (punctuation, symbols, spaces). Without texts: "other".
    """
    b, t = input_ids.shape
    real = attention_mask.bool()
    first_real = real.to(torch.uint8).argmax(dim=-1).tolist()
    out = []
    for i in range(b):
        row = []
        for j in range(t):
            if not real[i, j]:
                cls = "pad"
            elif j == first_real[i] or (bos_token_id is not None and int(input_ids[i, j]) == bos_token_id):
                cls = "bos"
            elif int(max_rows[i, j]) <= tail_rows:
                cls = "last-tokens"
            elif tokens is None:
                cls = "other"
            else:
                cls = _text_class(tokens[i][j])
            row.append(cls)
        out.append(row)
    return out


def _unpack(inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids [B, T] and attention_mask (None when not given) from a BatchEncoding / dict or a tensor of ids."""
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError("inputs must have 'input_ids' (a BatchEncoding or dict), or be a LongTensor of ids")
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        ids, mask = inputs, None
    ids = torch.as_tensor(ids)
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be an integer tensor [T] or [B, T], got {tuple(ids.shape)} {ids.dtype}")
    ids = ids.long().reshape(-1, ids.shape[-1])
    if mask is not None:
        mask = torch.as_tensor(mask).long().reshape(ids.shape)
    return ids, mask


def _layer_spec(model: nn.Module, layers: int | Iterable[int] | None) -> str | dict[int, str]:
    if layers is None:
        return "all"
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not wanted:
        raise ValueError("layers is empty; pass None for every layer")
    if any(isinstance(layer, int) and layer < 0 for layer in wanted):
        num_layers = TransformersIntegration(model).num_layers
        wanted = [layer + num_layers if isinstance(layer, int) and layer < 0 else layer for layer in wanted]
    return dict.fromkeys(wanted, "all")  # the patch validates the indices


@torch.inference_mode()
@runs_unpatched
def sinks(
    model: nn.Module,
    inputs: Any,
    *,
    tokenizer: Any = None,
    threshold: float = 0.1,
    min_visible_rows: int = 1,
    layers: int | Iterable[int] | None = None,
    tail_rows: int | None = None,
) -> SinkAnalysis:
    """Run `model` once with a neutral ACT patch (beta=1, every head of `layers`, default every layer) and return
    its sink statistic as a `SinkAnalysis`. The patch is removed afterwards; outputs are those of the plain model.

    inputs: a BatchEncoding / dict with input_ids (and attention_mask; left or right padding), or a LongTensor of
    ids [T] or [B, T]. tokenizer: decodes token texts for the table and the token classes. threshold /
    min_visible_rows: ACT's sink rule. layers: model layer indices (negative ones count from the end).
    tail_rows: keys seen by at most this many rows are classed "last-tokens" (default max(4, min_visible_rows)).
    """
    ids, mask = _unpack(inputs)
    heads = _layer_spec(model, layers)
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": ids.to(device)}
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device)
    options = dict(beta=1.0, threshold=threshold, min_visible_rows=min_visible_rows, heads=heads)
    with patched(model, "act", **options) as patch:
        model(**kwargs)
        stats = patch.method.column_stats()
        num_heads_all = patch.integration.num_heads
    analysed = sorted(patch.method.heads)
    missing = [layer for layer in analysed if layer not in stats]
    if missing:
        raise RuntimeError(f"attnpatch sinks: layers {missing} did not run their attention in the forward pass")
    num_heads = [num_heads_all[layer] for layer in analysed]
    width = max(num_heads)
    b, t = ids.shape
    column_mean = torch.zeros(len(analysed), width, b, t)
    count = torch.zeros(len(analysed), width, b, t, dtype=torch.long)
    for i, layer in enumerate(analysed):
        s = stats[layer]
        column_mean[i, : num_heads[i]] = s.mean.float().cpu().transpose(0, 1)
        count[i, : num_heads[i]] = s.count.expand_as(s.colsum).round().long().cpu().transpose(0, 1)
    mask = torch.ones_like(ids) if mask is None else mask.cpu()
    count = count * mask.bool()[None, None]  # pads are seen by no valid row; make sure of it
    tokens = None
    if tokenizer is not None:
        texts = {i: tokenizer.decode([i]) for i in ids.unique().tolist()}
        tokens = [[texts[i] for i in row] for row in ids.tolist()]
    tail = max(DEFAULT_TAIL_ROWS, min_visible_rows) if tail_rows is None else tail_rows
    classes = classify_tokens(
        ids,
        mask,
        count.amax(dim=(0, 1)),
        tokens=tokens,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        tail_rows=tail,
    )
    return SinkAnalysis(
        layers=analysed,
        num_heads=num_heads,
        input_ids=ids,
        attention_mask=mask,
        column_mean=column_mean,
        count=count,
        threshold=float(threshold),
        min_visible_rows=int(min_visible_rows),
        tail_rows=int(tail),
        token_classes=classes,
        tokens=tokens,
    )


def find_sinks(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, threshold: float = 0.1
) -> list[SinkReport]:
    """Run `model` once with neutral ACT (beta=1, every head) and list every key above `threshold`, first sinks
    included, sorted by (batch, layer, head, position). A flat view of `sinks(...)`."""
    inputs = input_ids if attention_mask is None else {"input_ids": input_ids, "attention_mask": attention_mask}
    return [
        SinkReport(r["layer"], r["head"], r["sequence"], r["position"], r["column_mean"], r["count"], r["first"])
        for r in sinks(model, inputs, threshold=threshold).table()
    ]
