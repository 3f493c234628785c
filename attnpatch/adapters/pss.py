"""Progressive self-supervised attention learning, PSS (Tang et al., ACL 2019; Su et al., AI 2021); the README's
"Training adapters" section has the results.

Mining rounds k = 1..K: train a fresh model on the data with the words mined so far erased, record each training
example's attention over its words signed by correctness (+alpha right, -alpha wrong), and when the entropy of |alpha|
over its non-zero entries is below epsilon bits, mine the argmax word: erase it from the next round's input and
remember it as "active" (from a correct prediction) or "misleading". Final training runs on the unerased data with
CE + lam * mean_b sum_j (alpha_j * amask_j - target_j)^2, amask = 1 at mined words, target from `avalue` (1 at active
words): "uniform" divides by the example's number of active words (TNet, the ACL-2019 code; an example without active
words gets target 0 where the code gives NaN), "one" keeps 1 (the BERT code).

The attention supervised is one distribution per example: the aspect-attention pooling head (`AspectAttentionHead`,
the paper's BERT variant) or a probe of a self-attention row (`PSSProbe`, e.g. the [CLS] row of a chosen head).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import AttentionAdapterBase

TARGETS = ("uniform", "one")


@dataclass(frozen=True)
class PSSConfig:
    """rounds K, entropy threshold epsilon in bits, loss weight lam, target convention, and (for `PSSProbe`) the
    probed self-attention row (layer, head, query)."""

    rounds: int = 5
    entropy_bits: float = 4.0
    lam: float = 0.1
    target: str = "uniform"
    probe: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, numbers.Integral) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        for name in ("entropy_bits", "lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.probe is not None:
            if len(self.probe) != 3:
                raise ValueError(f"probe must be (layer, head, query), got {self.probe!r}")
            object.__setattr__(self, "probe", tuple(int(x) for x in self.probe))


def entropy_bits(alpha: torch.Tensor) -> torch.Tensor:
    """-sum |a| log2 |a| over the non-zero entries of each row of `alpha` [N, W] (signed or not)."""
    a = alpha.abs().double()
    logs = torch.where(a > 0, torch.log2(a.clamp_min(1e-300)), torch.zeros_like(a))
    return -(a * logs).sum(dim=-1)


@dataclass
class MinedRound:
    """One round's result per example: the mined word index (-1: none) and whether it came from a correct
    prediction (active) or a wrong one (misleading)."""

    word: torch.Tensor  # [N] long
    active: torch.Tensor  # [N] bool

    @property
    def count(self) -> int:
        return int((self.word >= 0).sum())


def mine_round(signed_alpha: torch.Tensor, entropy_threshold: float) -> MinedRound:
    """Mine the argmax |alpha| word of every example whose attention entropy is below `entropy_threshold` bits.

    `signed_alpha` [N, W]: word-level attention, +alpha for correctly predicted examples and -alpha otherwise; erased
    and padded words are 0 (never mined). Rows that are all 0 mine nothing.
    """
    if signed_alpha.dim() != 2:
        raise ValueError(f"signed_alpha must be [examples, words], got shape {tuple(signed_alpha.shape)}")
    mag = signed_alpha.abs()
    best = mag.argmax(dim=-1)
    low = (entropy_bits(signed_alpha) < entropy_threshold) & (mag.amax(dim=-1) > 0)
    word = torch.where(low, best, torch.full_like(best, -1))
    active = signed_alpha.gather(1, best[:, None]).squeeze(1) > 0
    return MinedRound(word=word, active=active & low)


@dataclass
class MinedWords:
    """Words mined for each example across rounds: (word index, active, round) triples, and each round's count."""

    num_examples: int
    words: list[list[tuple[int, bool, int]]] = field(default_factory=list)
    per_round: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.words:
            self.words = [[] for _ in range(self.num_examples)]

    def add(self, mined: MinedRound) -> None:
        if mined.word.shape[0] != self.num_examples:
            raise ValueError(f"a round mined {mined.word.shape[0]} examples, expected {self.num_examples}")
        round_index = len(self.per_round)
        for i, (w, a) in enumerate(zip(mined.word.tolist(), mined.active.tolist(), strict=True)):
            if w >= 0:
                self.words[i].append((w, bool(a), round_index))
        self.per_round.append(mined.count)

    def _mined(self, example: int, rounds: int | None) -> list[tuple[int, bool, int]]:
        return [m for m in self.words[example] if rounds is None or m[2] < rounds]

    def erased(self, rounds: int | None = None) -> list[set[int]]:
        """The words erased from each example after the first `rounds` rounds (default: all)."""
        return [{w for w, _, _ in self._mined(i, rounds)} for i in range(self.num_examples)]

    def targets(self, num_words: int, rounds: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """amask, avalue [N, num_words] from the words of the first `rounds` rounds (default: all)."""
        amask = torch.zeros(self.num_examples, num_words)
        avalue = torch.zeros(self.num_examples, num_words)
        for i in range(self.num_examples):
            for w, active, _ in self._mined(i, rounds):
                if w < num_words:
                    amask[i, w] = 1.0
                    avalue[i, w] = float(active)
        return amask, avalue


def progressive_mining(
    train_and_record: Callable[[list[set[int]]], tuple[torch.Tensor, torch.Tensor]],
    num_examples: int,
    config: PSSConfig | None = None,
) -> MinedWords:
    """Run the K mining rounds. `train_and_record(erased)` trains a fresh model on the training set with
    `erased[i]` (word indices) removed from example i, and returns its word-level attention [N, W] on the training
    set and whether each example was predicted correctly [N]."""
    config = config or PSSConfig()
    mined = MinedWords(num_examples)
    for _ in range(config.rounds):
        alpha, correct = train_and_record(mined.erased())
        if alpha.shape[0] != num_examples or correct.shape != (num_examples,):
            raise ValueError(
                f"train_and_record must return alpha [{num_examples}, words] and correct [{num_examples}], got "
                f"{tuple(alpha.shape)} and {tuple(correct.shape)}"
            )
        erased = mined.erased()
        alpha = alpha.clone()
        for i, words in enumerate(erased):  # an erased word cannot be mined again
            alpha[i, list(words)] = 0.0
        sign = torch.where(correct.bool(), 1.0, -1.0).to(alpha.dtype)
        mined.add(mine_round(alpha * sign[:, None], config.entropy_bits))
    return mined


def pss_loss(alpha: torch.Tensor, amask: torch.Tensor, avalue: torch.Tensor, target: str = "uniform") -> torch.Tensor:
    """mean over the batch of sum_j (alpha_j * amask_j - t_j)^2, t = avalue ("one") or avalue / #active ("uniform").
    All three are [B, W]; multiply by lam yourself (or use `PSSProbe.loss`)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not (alpha.shape == amask.shape == avalue.shape):
        raise ValueError(
            f"alpha, amask and avalue must have one shape [batch, words], got {tuple(alpha.shape)}, "
            f"{tuple(amask.shape)} and {tuple(avalue.shape)}"
        )
    t = avalue.to(alpha.dtype)
    if target == "uniform":
        t = t / t.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return ((alpha * amask.to(alpha.dtype) - t) ** 2).sum(dim=-1).mean()


def tokens_to_words(alpha: torch.Tensor, word_ids: torch.Tensor, num_words: int) -> torch.Tensor:
    """Sum token-level attention [B, T] into words [B, num_words]; `word_ids` [B, T] gives each token's word (-1:
    a token that belongs to no context word: special tokens, the aspect, padding)."""
    if alpha.shape != word_ids.shape:
        raise ValueError(f"alpha {tuple(alpha.shape)} and word_ids {tuple(word_ids.shape)} must have one shape")
    keep = word_ids >= 0
    out = alpha.new_zeros(alpha.shape[0], num_words)
    return out.scatter_add(1, word_ids.clamp(min=0).long(), alpha * keep)


def erase_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, erase: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input-erasure hook: tokens where `erase` [B, T] is True become `pad_token_id` with attention mask 0."""
    if erase.shape != input_ids.shape:
        raise ValueError(f"erase mask {tuple(erase.shape)} must match input_ids {tuple(input_ids.shape)}")
    erase = erase.bool()
    return input_ids.masked_fill(erase, pad_token_id), attention_mask.masked_fill(erase, 0)


class AspectAttentionHead(nn.Module):
    """The paper's aspect-attention classifier on top of an encoder (PSSAttention, BERT variant):
    aspect pooling q = sum softmax(w . h + mask_aspect) h; context attention alpha = softmax(h . q / sqrt(d) + mask)
    over context tokens (not aspect, special or pad); logits = Linear(dropout(sum alpha h + q))."""

    def __init__(self, hidden_size: int, num_labels: int = 3, dropout: float = 0.1):
        super().__init__()
        self.aspect_score = nn.Linear(hidden_size, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(
        self, hidden: torch.Tensor, aspect_mask: torch.Tensor, context_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H]; aspect_mask, context_mask [B, T] (1 = in); returns logits [B, labels], alpha [B, T]."""
        if not bool(aspect_mask.bool().any(dim=-1).all()):
            raise ValueError("every example needs at least one aspect token (aspect_mask is all 0 in some row)")
        neg = torch.finfo(hidden.dtype).min
        aspect_logits = self.aspect_score(hidden).squeeze(-1).masked_fill(~aspect_mask.bool(), neg)
        q = (torch.softmax(aspect_logits, dim=-1)[..., None] * hidden).sum(1)
        scores = (hidden @ q[:, :, None]).squeeze(-1) / math.sqrt(hidden.shape[-1])
        context = context_mask.bool()
        alpha = torch.softmax(scores.masked_fill(~context, neg), dim=-1) * context.any(-1, keepdim=True)
        alpha = alpha.masked_fill(~context, 0.0)
        feat = (alpha[..., None] * hidden).sum(1) + q
        return self.classifier(self.dropout(feat)), alpha


class PSSProbe(AttentionAdapterBase):
    """PSS on a self-attention row: the probed (layer, head, query) probabilities of `model` are the supervised
    attention. `attention()` returns them [B, Lk] after a forward; `loss(amask, avalue)` gives lam * pss_loss."""

    kind = "pss"
    config_class = PSSConfig

    def __init__(self, model: nn.Module, config: PSSConfig | None = None, **options: Any):
        if config is None:
            config = PSSConfig(**options)
        elif options:
            raise TypeError("pass either config= or keyword options, not both")
        if config.probe is None:
            raise ValueError("PSSProbe needs probe=(layer, head, query), e.g. (5, 0, 0) for the [CLS] row of head 0")
        layer, head, query = config.probe
        super().__init__(model, config, layers=[layer])
        try:
            self.method.add_probe("pss", layer, head, query)
        except ValueError:
            self.detach()  # a refused probe leaves the model as it was
            raise

    def attention(self) -> torch.Tensor:
        values = self.method.probe_values
        if "pss" not in values:
            raise RuntimeError("no probed attention yet: run a forward of the model first")
        return values["pss"]

    def loss(self, amask: torch.Tensor, avalue: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        alpha = self.attention() if alpha is None else alpha
        return self.config.lam * pss_loss(alpha, amask, avalue, self.config.target)
