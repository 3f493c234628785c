"""Batched log-likelihood scoring of multiple-choice items with any causal LM and its tokenizer.

Each item's context is tokenized once (with the tokenizer's own leading special tokens, e.g. BOS, but never trailing
ones) and each option separately, and the ids are concatenated, so the continuation boundary is exact. Rows are left
padded with explicit position ids where the model takes them (else right padded): real tokens keep their positions and
never see a pad. Options whose input is a prefix of another option's input
(e.g. single-token answers " no" / " yes") share one row. Rows are sorted by length, and only the logits of
continuation positions are computed (`logits_to_keep`) and log-softmaxed where the model supports it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from .metrics import continuation_length
from .tasks import Item

Normalize = Literal["chars", "tokens", "none"]


@dataclass
class _Target:
    item: int
    option: int
    start: int  # position whose logits predict the first continuation token
    tokens: list[int]


@dataclass
class _Row:
    ids: list[int]
    targets: list[_Target] = field(default_factory=list)


def _special_prefix(with_special: list[int], plain: list[int]) -> list[int]:
    """The tokens the tokenizer puts before the text (BOS, CLS, ...); trailing ones (EOS, SEP) are dropped."""
    n = len(plain)
    for k in range(len(with_special) - n + 1):
        if with_special[k : k + n] == plain:
            return with_special[:k]
    return []


def encode_context(tokenizer, text: str) -> list[int]:
    """Ids of `text` with the leading special tokens the tokenizer adds by default."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = _special_prefix(tokenizer(text)["input_ids"], plain) + plain
    if not ids:
        raise ValueError("empty context and the tokenizer adds no BOS: the first option token has no prediction")
    return ids


def encode_option(tokenizer, text: str) -> list[int]:
    """Ids of an option continuation, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"option {text!r} encodes to no tokens")
    return ids


def _item_rows(index: int, context: list[int], options: list[list[int]]) -> list[_Row]:
    """Rows for one item; an option whose input is a prefix of a longer option's input reuses that row."""
    rows: list[_Row] = []
    for j in sorted(range(len(options)), key=lambda j: -len(options[j])):
        seq = context + options[j][:-1]
        target = _Target(index, j, len(context) - 1, options[j])
        row = next((r for r in rows if r.ids[: len(seq)] == seq), None)
        if row is None:
            rows.append(_Row(seq, [target]))
        else:
            row.targets.append(target)
    return rows


def _build_rows(tokenizer, items: Sequence[Item]) -> tuple[list[_Row], list[list[int]]]:
    """All rows, longest first, and the token count of every option."""
    rows, n_tokens = [], []
    for i, item in enumerate(items):
        options = [encode_option(tokenizer, o) for o in item.options]
        rows += _item_rows(i, encode_context(tokenizer, item.context), options)
        n_tokens.append([len(o) for o in options])
    rows.sort(key=lambda r: -len(r.ids))
    return rows, n_tokens


def _forward_kwargs(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _batch_logprobs(model, rows: list[_Row], pad_id: int, accepted: set[str]) -> list[float]:
    """Summed log-probs of every target of `rows`, in row then target order, from one padded forward.

    With `logits_to_keep` and `position_ids` the rows are left padded with explicit positions, so every target sits
    in the last few positions and only those get vocabulary logits (the lm head of a 262k-token vocabulary costs more
    than the whole 270M-parameter body otherwise); else they are right padded and all positions get logits.
    """
    length = max(len(r.ids) for r in rows)
    left = "logits_to_keep" in accepted and "position_ids" in accepted
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    shift = []
    for b, row in enumerate(rows):
        pad = length - len(row.ids) if left else 0
        input_ids[b, pad : pad + len(row.ids)] = torch.tensor(row.ids)
        mask[b, pad : pad + len(row.ids)] = 1
        shift.append(pad)
    device = _device(model)
    first = min(shift[b] + t.start for b, r in enumerate(rows) for t in r.targets)
    kwargs: dict = {"use_cache": False} if "use_cache" in accepted else {}
    if left:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(device)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = length - first  # the last positions hold every target
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    if logits.shape[1] not in (length, length - first):
        raise RuntimeError(f"model returned logits for {logits.shape[1]} positions, expected {length}")
    offset = first if logits.shape[1] == length - first else 0
    b_idx, p_idx, tokens, sizes = [], [], [], []
    for b, row in enumerate(rows):
        for t in row.targets:
            start = shift[b] + t.start - offset
            b_idx += [b] * len(t.tokens)
            p_idx += range(start, start + len(t.tokens))
            tokens += t.tokens
            sizes.append(len(t.tokens))
    picked = logits[torch.tensor(b_idx, device=device), torch.tensor(p_idx, device=device)].float()
    token_lp = picked.gather(-1, torch.tensor(tokens, device=device)[:, None]).squeeze(-1) - picked.logsumexp(-1)
    return [float(s.sum()) for s in token_lp.split(sizes)]


class BatchedRows:
    """Items turned into the scorer's rows once, in fixed batches, scored under any per-batch context (calibration
    replays cached layers per batch, so the batches must be the same on every pass)."""

    def __init__(self, model, tokenizer, items: Sequence[Item], batch_size: int):
        self.model, self.items = model, list(items)
        rows, self.n_tokens = _build_rows(tokenizer, self.items)
        self.batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.accepted = _forward_kwargs(model)

    def forward(self, batch: list[_Row]) -> list[float]:
        """Log-probs of the targets of one batch (row then target order)."""
        return _batch_logprobs(self.model, batch, self.pad_id, self.accepted)

    def logprobs(
        self,
        context: Callable[[int], contextlib.AbstractContextManager] | None = None,
        progress: bool = False,
        desc: str = "scoring",
        done: Sequence[Sequence[float]] = (),
        on_batch: Callable[[list[list[float]]], None] | None = None,
    ):
        """Summed log-prob of every option of every item; batch b runs inside `context(b)` when given.

        `done`: the values of the first batches, as an earlier pass gave them (those batches are not run again);
        `on_batch` is called after each batch with the values of every batch so far (to save a long pass's progress).
        """
        if len(done) > len(self.batches):
            raise ValueError(f"{len(done)} batches done, but there are only {len(self.batches)}")
        per_batch = [list(values) for values in done]
        logprobs = [[0.0] * len(item.options) for item in self.items]
        total = sum(len(batch) for batch in self.batches)
        initial = sum(len(batch) for batch in self.batches[: len(done)])
        with (
            torch.inference_mode(),
            tqdm(total=total, initial=initial, desc=desc, unit="seq", disable=not progress) as bar,
        ):
            for b, batch in enumerate(self.batches):
                if b >= len(per_batch):
                    with context(b) if context else contextlib.nullcontext():
                        per_batch.append(self.forward(batch))
                    bar.update(len(batch))
                    if on_batch is not None:
                        on_batch(per_batch)
                values = iter(per_batch[b])
                for row in batch:
                    for t in row.targets:
                        logprobs[t.item][t.option] = next(values)
        return logprobs


def option_logprobs(
    model,
    tokenizer,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring",
    done: Sequence[Sequence[float]] = (),
    on_batch: Callable[[list[list[float]]], None] | None = None,
):
    """Summed log-probability of each option's tokens given the item's context: list (items) of lists (options).

    The model should be in eval mode; `batch_size` counts padded sequences per forward; `desc` labels the progress bar.
    `done` and `on_batch` resume and save a long pass batch by batch (see `BatchedRows.logprobs`; the batches depend
    on the items and `batch_size` only, so a resumed pass gives what an uninterrupted one gives).
    """
    rows = BatchedRows(model, tokenizer, items, batch_size)
    return rows.logprobs(progress=progress, desc=desc, done=done, on_batch=on_batch)


def choose(logprobs: Sequence[float], options: Sequence[str], n_tokens: Sequence[int], normalize: Normalize) -> int:
    """Index of the best option: max log-prob per character ("chars": lm-eval's acc_norm, the option's length without
    its leading space, see `metrics`), per token ("tokens") or raw ("none": lm-eval's acc); first on ties."""
    if normalize == "chars":
        scores = [lp / continuation_length(o) for lp, o in zip(logprobs, options, strict=True)]
    elif normalize == "tokens":
        scores = [lp / n for lp, n in zip(logprobs, n_tokens, strict=True)]
    elif normalize == "none":
        scores = list(logprobs)
    else:
        raise ValueError(f"normalize must be 'chars', 'tokens' or 'none', not {normalize!r}")
    return max(range(len(scores)), key=scores.__getitem__)


def score_items(
    model,
    tokenizer,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    normalize: Normalize = "chars",
    progress: bool = True,
    desc: str = "scoring",
) -> list[int]:
    """Predicted option index of every item (see `choose` for `normalize`); `desc` labels the progress bar."""
    if normalize not in ("chars", "tokens", "none"):
        raise ValueError(f"normalize must be 'chars', 'tokens' or 'none', not {normalize!r}")
    rows = BatchedRows(model, tokenizer, items, batch_size)
    logprobs, n_tokens = rows.logprobs(progress=progress, desc=desc), rows.n_tokens
    return [choose(lp, it.options, n, normalize) for lp, n, it in zip(logprobs, n_tokens, items, strict=True)]
