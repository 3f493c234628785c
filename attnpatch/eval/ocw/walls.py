"""Only Connect Wall (OCW, Naeini et al., NeurIPS 2023): walls, prompts and the parser of model output.

A wall has 16 clues that form 4 groups of 4, with red herrings; task 1 groups the clues, task 2 names each group's
connection (given the ground-truth groups). This module loads walls from the dataset's JSON schema, builds the
prompts of the authors' LLM baselines (their `notebooks/run_openai.ipynb`) for base and chat-template models, and
parses model output into 4x4 groups and 4 connections. Metrics live in `ocw.metrics`, the log-likelihood solver in
`ocw.solver`, the A/B runner in `ocw.runner`.

Differences from the notebook, all deliberate:
- The project's copy of the data lists each wall's `words` in group order (the authors' released files were
  pre-shuffled: "Clues have already been shuffled"), so `Wall.clues(seed)` shuffles them with a per-wall seed.
- Clues are joined as "a, b, c" (the notebook's template renders a doubled space after "Clues:").
- With 0 shots the "Example solved wall(s):" block is left out rather than rendered empty.
- Parser: "Group N:" is removed within a line only (the notebook's `\\s*` could join two lines), list markers
  ("1.", "-"), code fences and header lines ("Here is the solved wall:") are skipped, the ". Connection: ..." suffix
  is removed from the whole line before splitting on commas (a connection with commas no longer leaks a word), and
  words are matched to the wall's clues ignoring case, quotes, surrounding punctuation and a label in front
  ("Clues: Ash"). For task 2 only lines that contain "Connection:" count (a blank or preamble line no longer takes
  a group's slot).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GROUP_KEYS = ("group_1", "group_2", "group_3", "group_4")
SPLITS = ("train", "validation", "test")
EXAMPLE_SEED = 42  # random.Random(42) picks the in-context walls, as in the authors' notebook
MAX_NEW_TOKENS = 144  # the notebook's max_tokens

TASK1_SYSTEM = (
    "You are currently competing in Round 3: Connecting Wall on the quiz show Only Connect. Your task: given 16 "
    '"clues" (words or phrases), solve the wall by grouping the clues into four groups of four. You will be given the '
    "clues as a list. You are also given examples of solved walls, which include the connections. Provide your answer "
    "as a list of four groups of four clues; separate groups by newlines and clues by commas. Do not try to guess the "
    "connection; only use the clues given and don't make up your own.\n\n"
    "Be careful! Connecting Wall is deliberately difficult. The puzzles are designed to include red herrings and to "
    "suggest more connections than actually exist. Some clues appear to fit into more than one category. Still, there "
    "is only one perfect solution for each wall."
)
TASK2_SYSTEM = (
    "You are currently competing in Round 3: Connecting Wall on the quiz show Only Connect. Your task: given 4 groups "
    'of 4 "clues" (words or phrases), determine the connection for each group. You will be given the groups as four '
    "lists of four. You are also given examples of solved walls, which include the connections. Provide your answer "
    'by repeating the four groups and adding it after "Connection:"\n\n'
    "Note: Connections might be thematic, linguistic, factual, mathematical and rely on both arcane subject areas and "
    "popular culture."
)


class OCWDataError(ValueError):
    """Walls that do not follow the OCW schema; `problems` lists "wall <id>: <field>: <what>" lines."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        super().__init__(f"{source or 'OCW data'}: {len(problems)} problem(s):\n  {shown}")


@dataclass(frozen=True)
class Wall:
    """One wall: 16 clues as in the file, the 4 ground-truth groups and their connections (group_1..group_4)."""

    wall_id: str
    words: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    connections: tuple[str, ...]
    season: int | None = None
    episode: int | None = None

    def clues(self, seed: int = 0) -> list[str]:
        """The 16 clues in a fixed pseudo-random order for this wall and `seed` (the same in every process)."""
        clues = list(self.words)
        random.Random(f"ocw:{seed}:{self.wall_id}").shuffle(clues)
        return clues


# ---------------------------------------------------------------------------------------------------- loading


def default_data_dir() -> Path:
    """`$ATTNPATCH_OCW_DIR`, else `../shared/data/ocw` next to the source checkout."""
    env = os.environ.get("ATTNPATCH_OCW_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data" / "ocw"


def load_walls(source: str | os.PathLike = "validation", data_dir: str | os.PathLike | None = None) -> list[Wall]:
    """Walls of a split name ("train", "validation", "test", read from `data_dir`) or of a JSON file path.

    The file is `{"dataset": [wall, ...], ...}` (or a bare list of walls). Raises OCWDataError naming the wall id and
    field of every wall that breaks the schema.
    """
    path = Path(source)
    if str(source) in SPLITS and not path.is_file():
        path = Path(data_dir) if data_dir is not None else default_data_dir()
        path = path / f"{source}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"OCW file {path} not found; pass a JSON path, or a split name with data_dir (or $ATTNPATCH_OCW_DIR) "
            "pointing at a folder with train.json / validation.json"
        )
    with open(path, encoding="utf-8") as f:
        return parse_walls(json.load(f), source=str(path))


def parse_walls(data: Any, source: str = "") -> list[Wall]:
    """Validate and convert decoded JSON (see `load_walls`) into Walls."""
    rows = data.get("dataset") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise OCWDataError(source, ['top level: expected {"dataset": [wall, ...]} or a list of walls'])
    walls, problems = [], []
    for index, row in enumerate(rows):
        wall, errors = _wall(row, index)
        problems += errors
        if wall is not None:
            walls.append(wall)
    ids = Counter(w.wall_id for w in walls)
    problems += [f"wall {i}: wall_id: appears {n} times" for i, n in ids.items() if n > 1]
    if problems:
        raise OCWDataError(source, problems)
    return walls


def _text(value: Any) -> str | None:
    """A clue or connection as text: strings as they are, numbers (e.g. a clue stored as 8.5) as written."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _texts(value: Any, n: int, field: str) -> tuple[list[str] | None, list[str]]:
    if not isinstance(value, list):
        return None, [f"{field}: expected a list of {n} strings, got {type(value).__name__}"]
    texts = [_text(v) for v in value]
    errors = [
        f"{field}[{i}]: expected a string, got {type(v).__name__}" for i, v in enumerate(value) if texts[i] is None
    ]
    if len(value) != n:
        errors.append(f"{field}: {len(value)} entries, expected {n}")
    return (None if errors else texts), errors


def _groups(value: Any) -> tuple[list[tuple[list[str], str]] | None, list[str]]:
    if not isinstance(value, dict):
        return None, [f"groups: expected an object with {', '.join(GROUP_KEYS)}"]
    if sorted(value) != list(GROUP_KEYS):
        return None, [f"groups: expected keys {', '.join(GROUP_KEYS)}, got {', '.join(map(str, value)) or 'none'}"]
    groups, errors = [], []
    for key in GROUP_KEYS:
        group = value[key]
        if not isinstance(group, dict):
            errors.append(f"groups.{key}: expected an object")
            continue
        words, errs = _texts(group.get("gt_words"), 4, f"groups.{key}.gt_words")
        connection = _text(group.get("gt_connection"))
        if connection is None:
            errs.append(f"groups.{key}.gt_connection: missing or not a string")
        errors += errs
        groups.append((words, connection))
    return (None if errors else groups), errors


def _norm(word: str) -> str:
    return word.lower().strip()


def _consistency(wall_words: list[str], groups: list[tuple[list[str], str]], connections: list[str]) -> list[str]:
    errors = []
    dup = [w for w, n in Counter(map(_norm, wall_words)).items() if n > 1]
    if dup:
        errors.append(f"words: duplicate clue(s) {dup}")
    in_groups = Counter(_norm(w) for words, _ in groups for w in words)
    in_words = Counter(map(_norm, wall_words))
    if in_groups != in_words:
        missing = sorted((in_groups - in_words).elements())
        extra = sorted((in_words - in_groups).elements())
        errors.append(f"groups: gt_words do not match the clues (not in words: {missing}; in no group: {extra})")
    for i, (connection, (_, expected)) in enumerate(zip(connections, groups, strict=True)):
        if connection != expected:
            errors.append(f"gt_connections[{i}]: {connection!r} differs from groups.{GROUP_KEYS[i]}.gt_connection")
    return errors


def _wall(row: Any, index: int) -> tuple[Wall | None, list[str]]:
    """A Wall, or None and the row's problems prefixed with its id."""
    if not isinstance(row, dict):
        return None, [f"wall #{index}: not an object"]
    wall_id = row.get("wall_id")
    name = wall_id if isinstance(wall_id, str) and wall_id else f"#{index}"
    errors = [] if name == wall_id else ["wall_id: missing or not a non-empty string"]
    missing = [f"{key}: missing" for key in ("words", "groups", "gt_connections") if key not in row]
    errors += missing
    if not missing:
        words, errs = _texts(row["words"], 16, "words")
        groups, group_errs = _groups(row["groups"])
        connections, conn_errs = _texts(row["gt_connections"], 4, "gt_connections")
        errors += errs + group_errs + conn_errs
        if words and groups and connections:
            errors += _consistency(words, groups, connections)
    if errors:
        return None, [f"wall {name}: {e}" for e in errors]
    wall = Wall(
        wall_id=wall_id,
        words=tuple(words),
        groups=tuple(tuple(g) for g, _ in groups),
        connections=tuple(connections),
        season=row.get("season"),
        episode=row.get("episode"),
    )
    return wall, []


# ---------------------------------------------------------------------------------------------------- prompts


def example_walls(train: Sequence[Wall], k: int, seed: int = EXAMPLE_SEED) -> list[Wall]:
    """The k in-context walls: `random.Random(seed).sample(train, k)`, the notebook's draw (one draw for all walls)."""
    if k > len(train):
        raise ValueError(f"{k} shots requested but only {len(train)} training walls")
    return random.Random(seed).sample(list(train), k) if k else []


def format_examples(examples: Sequence[Wall]) -> str:
    """ "Example i" blocks: one "w1, w2, w3, w4. Connection: c" line per group."""
    blocks = []
    for i, wall in enumerate(examples):
        lines = [f"{', '.join(g)}. Connection: {c}" for g, c in zip(wall.groups, wall.connections, strict=True)]
        blocks.append(f"Example {i + 1}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(system: str, user: str, tokenizer: Any = None) -> str:
    """The prompt text: the tokenizer's chat template (system + user, generation prompt) when it has one, else
    plain text that ends on a new line after the user message."""
    if tokenizer is not None and has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{user}\n"


def _user(examples: Sequence[Wall], body: str) -> str:
    head = f"Example solved wall(s):\n\n{format_examples(examples)}\n\n" if examples else ""
    return f"{head}{body}\n\nSolved wall:"


def grouping_prompt(wall: Wall, examples: Sequence[Wall] = (), tokenizer: Any = None, seed: int = 0) -> str:
    """Task 1 prompt: the wall's clues in `wall.clues(seed)` order."""
    return render(TASK1_SYSTEM, _user(examples, f"Clues: {', '.join(wall.clues(seed))}"), tokenizer)


def connections_prompt(wall: Wall, examples: Sequence[Wall] = (), tokenizer: Any = None) -> str:
    """Task 2 prompt: the ground-truth groups, each followed by ". Connection:"."""
    groups = "\n".join(f"{', '.join(g)}. Connection:" for g in wall.groups)
    return render(TASK2_SYSTEM, _user(examples, f"Groups:\n{groups}"), tokenizer)


# ---------------------------------------------------------------------------------------------------- parsing

_GROUP_LABEL = re.compile(r"Group[ \t]*\d+[ \t]*:?", re.I)
_LIST_MARKER = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")
_CONNECTION_SUFFIX = re.compile(r"\.?\s*Connection:.*", re.I)
_CONNECTION = re.compile(r"Connection:\s*(.*)", re.I)
_EDGE_PUNCT = "\"'`\u2018\u2019\u201c\u201d.,;:!?()[]{}*_ "


def _content_lines(text: str) -> list[str]:
    """Non-empty lines without "Group N:" labels and list markers; header lines ("...:", no comma) are skipped."""
    lines = []
    for line in _GROUP_LABEL.sub("", text).splitlines():
        line = _LIST_MARKER.sub("", line.strip()).strip()
        if line and not line.startswith("```") and not (line.endswith(":") and "," not in line):
            lines.append(line)
    return lines


def _complete(text: str) -> str:
    """`text` up to its last newline: the lines the model has finished."""
    return text[: text.rfind("\n") + 1]


def _snap(word: str, clues: Sequence[str]) -> str:
    """The clue `word` names when they differ only in case, quotes or surrounding punctuation, or by a label in front
    ("Clues: Ash" -> "Ash"); else `word` unchanged."""
    if not word or not clues:
        return word
    exact = {_norm(c): c for c in clues}
    loose = {_norm(c).strip(_EDGE_PUNCT): c for c in clues}
    for candidate in (word, word.rpartition(":")[2]):
        if _norm(candidate) in exact:
            return exact[_norm(candidate)]
        if _norm(candidate).strip(_EDGE_PUNCT) in loose:
            return loose[_norm(candidate).strip(_EDGE_PUNCT)]
    return word


def parse_groups(text: str | None, clues: Sequence[str] = ()) -> list[list[str]]:
    """Model output -> exactly 4 groups of exactly 4 words ("" where the output has none: misformatted).

    Lines become groups (first 4), commas separate words (first 4 per line); a trailing ". Connection: ..." is dropped.
    With `clues`, words that differ from a clue only in case, quotes or punctuation are replaced by the clue.
    """
    groups = []
    for line in _content_lines(text or "")[:4]:
        words = [_snap(w.strip(), clues) for w in _CONNECTION_SUFFIX.sub("", line).split(",")][:4]
        groups.append(words + [""] * (4 - len(words)))
    return groups + [[""] * 4 for _ in range(4 - len(groups))]


def parse_connections(text: str | None) -> list[str]:
    """Model output -> exactly 4 connections: the text after "Connection:" on the first 4 lines that have one."""
    found = [m.group(1).strip() for m in map(_CONNECTION.search, (text or "").splitlines()) if m]
    return found[:4] + [""] * (4 - len(found[:4]))


def grouping_done(text: str) -> bool:
    """True once the output holds 4 finished group lines (later text cannot change `parse_groups`)."""
    return len(_content_lines(_complete(text))) >= 4


def connections_done(text: str) -> bool:
    """True once the output holds 4 finished "Connection:" lines (later text cannot change `parse_connections`)."""
    return sum(bool(_CONNECTION.search(line)) for line in _complete(text).splitlines()) >= 4


def word_errors(groups: Sequence[Sequence[str]], clues: Sequence[str]) -> dict[str, int]:
    """The notebook's error analysis: misformatted ("" words) and hallucinated (not among the clues) word counts."""
    known = {_norm(c) for c in clues}
    words = [w for g in groups for w in g]
    return {
        "misformatted": sum(not _norm(w) for w in words),
        "hallucinated": sum(bool(_norm(w)) and _norm(w) not in known for w in words),
    }
