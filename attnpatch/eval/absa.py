"""SemEval-14 aspect-level sentiment data (as redistributed with the PSSAttention code) and its encoding for an
encoder with a word-level attention head.

File format (`../shared/data/absa/<set>/{train,test}.txt`): one whitespace-tokenised, lower-cased sentence per line;
the aspect's tokens carry `/p`, `/n` or `/0` (positive, negative, neutral). A maximal run of tagged tokens with one
label is one aspect; a line with several runs gives one example per run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.pss import erase_tokens

LABELS = {"n": 0, "0": 1, "p": 2}  # negative, neutral, positive
LABEL_NAMES = ("negative", "neutral", "positive")
_TAG = re.compile(r"^(.+)/([pn0])$")


@dataclass(frozen=True)
class AspectExample:
    """words of the sentence (tags removed), the aspect's word span [start, end), its label, and where it came from."""

    words: tuple[str, ...]
    aspect: tuple[int, int]
    label: int
    source: str


def parse_line(line: str, source: str) -> list[AspectExample]:
    """The examples of one data line; a line without any aspect tag is an error naming `source`."""
    tokens = [t for t in re.split(r"[ \t]+", line.strip()) if t]  # not str.split: a no-break space sits inside tokens
    words, tags = [], []
    for token in tokens:
        match = _TAG.match(token)
        words.append((match.group(1) if match else token).strip())
        tags.append(match.group(2) if match else None)
    runs: list[tuple[int, int, str]] = []
    for i, tag in enumerate(tags):
        if tag is None:
            continue
        if runs and runs[-1][1] == i and runs[-1][2] == tag:
            runs[-1] = (runs[-1][0], i + 1, tag)
        else:
            runs.append((i, i + 1, tag))
    if not runs:
        raise ValueError(
            f"{source}: no aspect label; aspect tokens must end in /p, /n or /0 (e.g. 'battery/n life/n is short')"
        )
    return [AspectExample(tuple(words), (s, e), LABELS[t], source) for s, e, t in runs]


def load_absa(path: str | Path) -> list[AspectExample]:
    """Every aspect example of one data file (e.g. `../shared/data/absa/laptop_val/train.txt`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ABSA file {path}; the data lives in ../shared/data/absa/<set>/<split>.txt")
    examples: list[AspectExample] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            examples.extend(parse_line(line, f"{path}:{number}"))
    return examples


def encode_words(
    tokenizer: Any,
    sentences: list[tuple[str, ...]],
    aspects: list[tuple[int, int]] | None = None,
    erased: list[set[int]] | None = None,
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """Tokenise word lists for a word-level attention head (a fast tokenizer with word_ids is needed).

    Returns input_ids, attention_mask, aspect_mask (the aspect's tokens, or the first special token [CLS] for
    sentence-level tasks when `aspects` is None), context_mask (tokens of context words: not aspect, special, pad or
    erased) and word_ids (each token's word index, -1 outside context words). Erased words (`erased[i]`: word
    indices) become pad tokens with attention mask 0, the paper's input erasure.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_words needs a fast tokenizer (one that reports word_ids)")
    enc = tokenizer(
        [list(s) for s in sentences], is_split_into_words=True, padding=True, truncation=True,
        max_length=max_length, return_tensors="pt",
    )  # fmt: skip
    batch, length = enc["input_ids"].shape
    aspect_mask = torch.zeros(batch, length, dtype=torch.long)
    word_ids = torch.full((batch, length), -1, dtype=torch.long)
    erase = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        span = aspects[i] if aspects is not None else None
        gone = erased[i] if erased is not None else set()
        for t, w in enumerate(enc.word_ids(i)):
            if w is None:
                continue
            if span is not None and span[0] <= w < span[1]:
                aspect_mask[i, t] = 1
            elif w in gone:
                erase[i, t] = True
            else:
                word_ids[i, t] = w
        if span is None:
            aspect_mask[i, 0] = 1
        elif not aspect_mask[i].any():
            raise ValueError(f"example {i}: its aspect was truncated away (max_length={max_length})")
    input_ids, attention_mask = erase_tokens(enc["input_ids"], enc["attention_mask"], erase, tokenizer.pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "aspect_mask": aspect_mask,
        "context_mask": (word_ids >= 0).long(),
        "word_ids": word_ids,
    }
