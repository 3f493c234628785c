"""Foresight tasks (Merlin's FPT and FIT, and an answer-only control) as prompt/target text, and their encoding.

Two input modes: "text" gives the observed frames as serialised trajectories (for a causal LM); "images" gives them as
rendered frames, one `<image>` per frame (for a LLaVA-style model with several images per sequence), with a legend
naming each identity's colour. Targets:

- FPT `track`: one subject's boxes in the following frames (images mode: from the first frame: detect, then track);
- FPT `detect_track`: every subject's boxes (text mode: the future frames; images mode: all frames);
- FIT `fit`: `Trajectories: <the question's subjects' future boxes>\\nAnswer: X` (trajectory first, then the answer);
- `answer`: `Answer: X` only.

`encode` tokenises prompt and target separately (BOS + prompt + target + EOS) and sets labels to -100 on everything
but the target and EOS; `collate` pads (left or right) and stacks the frames of every row in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .scenes import Question, Scene, render, tag
from .trajectory import ANSWER, TRAJECTORIES, format_box, format_trajectories, scene_tracks

IGNORE_INDEX = -100
IMAGE = "<image>"
MODES = ("text", "images")
KINDS = ("track", "detect_track", "fit", "answer")


@dataclass(frozen=True)
class Task:
    """One example: `prompt` (with one IMAGE marker per entry of `frames` in images mode) and `target` text."""

    kind: str
    prompt: str
    target: str
    scene: Scene = field(repr=False)
    question: Question | None = None
    subjects: tuple[int, ...] = ()  # whose trajectories the target writes
    target_frames: tuple[int, ...] = ()  # 0-based frames those trajectories cover
    frames: tuple[torch.Tensor, ...] = field(default=(), repr=False)


def question_text(question: Question, bins: int = 100) -> str:
    if question.kind == "reach":
        return f"Will {tag(question.subjects[0])} reach {format_box(question.region, bins)}?"
    if question.kind == "meet":
        return f"Will {tag(question.subjects[0])} and {tag(question.subjects[1])} meet?"
    return "Which leaves the view first?"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def observation(scene: Scene, mode: str = "text", bins: int = 100) -> tuple[str, tuple[torch.Tensor, ...]]:
    """The prompt's observation of the first `scene.observed` frames, and the frames rendered for images mode."""
    _check_mode(mode)
    seen = range(scene.observed)
    if mode == "text":
        return "Observed: " + format_trajectories(scene_tracks(scene, None, seen), bins) + "\n", ()
    legend = ", ".join(f"{tag(s)} {scene.names.get(s, 'subject')}" for s in scene.subjects)
    frames = " ".join(f"f{f + 1} {IMAGE}" for f in seen)
    return f"Frames: {frames}\nSubjects: {legend}\n", tuple(render(scene, f) for f in seen)


def _trajectory_task(
    scene: Scene, kind: str, subjects: tuple[int, ...], instruction: str, mode: str, bins: int
) -> Task:
    obs, frames = observation(scene, mode, bins)
    covered = range(scene.num_frames) if mode == "images" else scene.future()
    target = format_trajectories(scene_tracks(scene, subjects, covered), bins)
    return Task(kind, obs + instruction + "\n", target, scene, None, subjects, tuple(covered), frames)


def track_task(scene: Scene, subject: int, mode: str = "text", bins: int = 100) -> Task:
    """FPT: given the observation and a subject, its boxes in the following frames."""
    scene.check_subject(subject)
    return _trajectory_task(scene, "track", (subject,), f"Track {tag(subject)}:", mode, bins)


def detect_track_task(scene: Scene, mode: str = "text", bins: int = 100) -> Task:
    """FPT: every subject's boxes (detect and track)."""
    return _trajectory_task(scene, "detect_track", scene.subjects, "Track all:", mode, bins)


def question_task(scene: Scene, question: Question, kind: str = "fit", mode: str = "text", bins: int = 100) -> Task:
    """FIT (`kind='fit'`: trajectories of the question's subjects, then the answer) or answer-only (`'answer'`)."""
    if kind not in ("fit", "answer"):
        raise ValueError(f"a question task is 'fit' or 'answer', got {kind!r}")
    for s in question.subjects:
        scene.check_subject(s, "question subject")
    obs, frames = observation(scene, mode, bins)
    prompt = obs + "Question: " + question_text(question, bins) + "\n"
    subjects = question.relevant(scene)
    if kind == "answer":
        return Task(kind, prompt, f"{ANSWER} {question.answer}", scene, question, (), (), frames)
    future = scene.future()
    chain = format_trajectories(scene_tracks(scene, subjects, future), bins)
    target = f"{TRAJECTORIES} {chain}\n{ANSWER} {question.answer}"
    return Task(kind, prompt, target, scene, question, subjects, tuple(future), frames)


def fpt_tasks(scenes: Sequence[Scene], mode: str = "text", bins: int = 100) -> list[Task]:
    """Per scene: one `track` task per subject and one `detect_track` task."""
    out: list[Task] = []
    for scene in scenes:
        out += [track_task(scene, s, mode, bins) for s in scene.subjects]
        out.append(detect_track_task(scene, mode, bins))
    return out


# ---- encoding -------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    frames: tuple[torch.Tensor, ...] = ()


def check_frames(frames: Sequence[torch.Tensor], where: str) -> None:
    """All frames of one sequence must be [C, H, W] tensors of one size; ValueError naming `where` otherwise."""
    shapes = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, torch.Tensor) or frame.dim() != 3:
            got = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
            raise ValueError(f"{where}: frame {i} must be a [channels, height, width] tensor, got {got}")
        shapes.append(tuple(frame.shape))
    if len(set(shapes)) > 1:
        sizes = ", ".join(f"frame {i}: {'x'.join(map(str, s))}" for i, s in enumerate(shapes))
        raise ValueError(f"{where}: frames of different sizes in one sequence ({sizes}); resize them to one size")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode(
    task: Task,
    tokenizer,
    *,
    with_target: bool = True,
    image_token_id: int | None = None,
    tokens_per_image: int = 0,
    where: str = "task",
) -> Encoded:
    """BOS + prompt (+ target + EOS) token ids, labels -100 outside the target (and EOS). In images mode each IMAGE
    marker becomes `tokens_per_image` copies of `image_token_id`."""
    pieces = task.prompt.split(IMAGE)
    if len(pieces) - 1 != len(task.frames):
        raise ValueError(f"{where}: the prompt has {len(pieces) - 1} {IMAGE} markers but {len(task.frames)} frames")
    check_frames(task.frames, where)
    if task.frames and (image_token_id is None or tokens_per_image < 1):
        raise ValueError(f"{where}: a prompt with frames needs image_token_id and tokens_per_image >= 1")
    ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    for i, piece in enumerate(pieces):
        if i:
            ids += [image_token_id] * tokens_per_image
        if piece:
            ids += _ids(tokenizer, piece)
    labels = [IGNORE_INDEX] * len(ids)
    if with_target:
        target = _ids(tokenizer, task.target)
        if tokenizer.eos_token_id is not None:
            target.append(tokenizer.eos_token_id)
        ids += target
        labels += target
    return Encoded(ids, labels, task.frames)


def collate(rows: Sequence[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [B, L] padded on `side`; pixel_values [frames of all rows, C, H, W] in row
    order when there are frames."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        at = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, at] = torch.tensor(row.input_ids)
        mask[i, at] = 1
        labels[i, at] = torch.tensor(row.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    frames = [f for row in rows for f in row.frames]
    if frames:
        check_frames(frames, "batch")
        batch["pixel_values"] = torch.stack(frames)
    return batch


class CharTokenizer:
    """A character tokenizer for tiny random models (ids from `offset`, below: pad 0, BOS 1, EOS 2)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    ALPHABET = "abcdefghijklmnopqrstuvwxyzAFOQSTW0123456789 []<>,;:?.\n"  # the task texts' characters

    def __init__(self, offset: int = 8):
        self.offset = offset
        self._index = {c: offset + i for i, c in enumerate(self.ALPHABET)}

    def __len__(self) -> int:
        return self.offset + len(self.ALPHABET)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        unknown = sorted({c for c in text if c not in self._index})
        if unknown:
            raise ValueError(f"CharTokenizer cannot encode {unknown!r}")
        ids = [self._index[c] for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        out = []
        for i in ids:
            if self.offset <= i < len(self):
                out.append(self.ALPHABET[i - self.offset])
            elif not skip_special_tokens:
                out.append(f"<{i}>")
        return "".join(out)
