"""Multi-object scenes for foresight training: subjects with identities moving over frames, as normalised boxes.

A `Scene` holds, per subject id (1, 2, ...), one box (x1, y1, x2, y2) in [0, 1] per frame, or None once the subject has
left the view (its centre left [0, 1]); the first `observed` frames are the observation, the rest the future.
`generate_scene` draws one from a seeded RNG (constant acceleration plus a little jitter, so a constant-velocity
extrapolation is close but not exact); `make_questions` asks about the future (will A reach region R, will A and B
meet, which leaves the view first); `make_splits` returns train/validation/test lists; `render` draws a frame.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

Box = tuple[float, float, float, float]
COLOUR_NAMES = ("red", "green", "blue", "yellow", "pink", "cyan")
COLOURS = ((1.0, 0.2, 0.2), (0.2, 0.9, 0.2), (0.3, 0.4, 1.0), (1.0, 0.9, 0.1), (0.9, 0.2, 0.9), (0.1, 0.9, 0.9))
QUESTION_KINDS = ("reach", "meet", "leave")


def tag(subject: int) -> str:
    """The identity tag of a subject in text: `<id3>`."""
    return f"<id{subject}>"


def check_box(box: Sequence[float], where: str) -> Box:
    """`box` as a float 4-tuple with 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1; ValueError naming `where`."""
    if len(box) != 4:
        raise ValueError(f"{where}: a box has 4 numbers (x1, y1, x2, y2), got {len(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise ValueError(f"{where}: box {tuple(box)} lies outside [0, 1]; boxes are normalised to the frame")
    if x1 > x2 or y1 > y2:
        raise ValueError(f"{where}: box {tuple(box)} has x1 > x2 or y1 > y2")
    return (x1, y1, x2, y2)


def centre(box: Box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def boxes_meet(a: Box, b: Box) -> bool:
    """Whether two boxes overlap (touching edges count)."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


@dataclass(frozen=True)
class Scene:
    """tracks: subject id -> one box or None (out of view, for good) per frame; observed: frames given as input."""

    tracks: Mapping[int, Sequence[Box | None]]
    observed: int
    frame_size: int = 32  # pixels per side when rendered
    names: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tracks:
            raise ValueError("a scene needs at least one subject")
        lengths = {len(t) for t in self.tracks.values()}
        if len(lengths) != 1:
            raise ValueError(f"every subject needs one entry per frame; track lengths differ: {sorted(lengths)}")
        frames = lengths.pop()
        if not 1 <= self.observed < frames:
            raise ValueError(f"observed must lie in [1, {frames - 1}] for {frames} frames, got {self.observed}")
        clean: dict[int, tuple[Box | None, ...]] = {}
        for subject, track in sorted(self.tracks.items()):
            if isinstance(subject, bool) or not isinstance(subject, int) or subject < 1:
                raise ValueError(f"subject ids are integers >= 1, got {subject!r}")
            boxes, gone = [], False
            for f, box in enumerate(track):
                where = f"scene subject {tag(subject)} frame f{f + 1}"
                if box is None:
                    gone = True
                    boxes.append(None)
                    continue
                if gone:
                    raise ValueError(f"{where}: a subject that left the view does not come back")
                boxes.append(check_box(box, where))
            if boxes[0] is None:
                raise ValueError(f"scene subject {tag(subject)} is not in view in the first frame")
            clean[subject] = tuple(boxes)
        object.__setattr__(self, "tracks", clean)

    @property
    def num_frames(self) -> int:
        return len(next(iter(self.tracks.values())))

    @property
    def subjects(self) -> tuple[int, ...]:
        return tuple(self.tracks)

    def check_subject(self, subject: int, what: str = "subject") -> int:
        if subject not in self.tracks:
            known = ", ".join(tag(s) for s in self.tracks)
            raise ValueError(f"{what} {tag(subject)} is not in the scene (its subjects: {known})")
        return subject

    def future(self) -> range:
        """0-based indices of the frames to predict."""
        return range(self.observed, self.num_frames)


@dataclass(frozen=True)
class Question:
    """A question about the scene's future: kind 'reach' (subjects[0] reaches `region`), 'meet' (subjects[0] and
    subjects[1] overlap) or 'leave' (which subject leaves the view first; answer a tag or 'none')."""

    kind: str
    subjects: tuple[int, ...]
    answer: str
    region: Box | None = None

    def relevant(self, scene: Scene) -> tuple[int, ...]:
        """The subjects whose trajectories a trajectory-first answer writes."""
        return scene.subjects if self.kind == "leave" else self.subjects


def answer(scene: Scene, kind: str, subjects: Sequence[int] = (), region: Box | None = None) -> str:
    """The true answer to a question about the future frames of `scene`."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; one of {QUESTION_KINDS}")
    for s in subjects:
        scene.check_subject(s, "question subject")
    future = list(scene.future())
    if kind == "reach":
        if region is None or len(subjects) != 1:
            raise ValueError("a 'reach' question names one subject and a region")
        region = check_box(region, "question region")
        hit = any(
            (b := scene.tracks[subjects[0]][f]) is not None
            and region[0] <= centre(b)[0] <= region[2]
            and region[1] <= centre(b)[1] <= region[3]
            for f in future
        )
        return "yes" if hit else "no"
    if kind == "meet":
        if len(subjects) != 2 or subjects[0] == subjects[1]:
            raise ValueError("a 'meet' question names two different subjects")
        a, b = (scene.tracks[s] for s in subjects)
        hit = any(a[f] is not None and b[f] is not None and boxes_meet(a[f], b[f]) for f in future)
        return "yes" if hit else "no"
    for f in future:
        gone = [s for s in scene.subjects if scene.tracks[s][f] is None and scene.tracks[s][f - 1] is not None]
        if gone:
            return tag(gone[0]) if len(gone) == 1 else "tie"
    return "none"


# ---- generation ----------------------------------------------------------------------------------------------------


def _simulate(rng: random.Random, frames: int, size: tuple[float, float], margin: float) -> list[Box | None]:
    w, h = size
    cx, cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
    vx, vy = rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)
    ax, ay = rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025)
    track: list[Box | None] = []
    for _ in range(frames):
        if track and track[-1] is None or not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
            track.append(None)
        else:
            box = (max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(1.0, cx + w / 2), min(1.0, cy + h / 2))
            track.append(tuple(round(v, 4) for v in box))  # type: ignore[arg-type]
        cx, cy = cx + vx + rng.gauss(0, 0.004), cy + vy + rng.gauss(0, 0.004)
        vx, vy = vx + ax, vy + ay
    return track


def generate_scene(
    rng: random.Random, *, subjects: int = 2, observed: int = 2, future: int = 3, frame_size: int = 32
) -> Scene:
    """A random scene: `subjects` boxes (sides 0.08-0.16) moving with constant acceleration plus jitter, all in view
    during the observed frames."""
    while True:
        tracks = {
            s + 1: _simulate(rng, observed + future, (rng.uniform(0.08, 0.16), rng.uniform(0.08, 0.16)), 0.15)
            for s in range(subjects)
        }
        if all(t[observed - 1] is not None for t in tracks.values()):
            names = {s: f"{COLOUR_NAMES[(s - 1) % len(COLOUR_NAMES)]} square" for s in tracks}
            return Scene(tracks, observed, frame_size, names)


def _random_question(rng: random.Random, scene: Scene, kind: str) -> Question:
    subjects = list(scene.subjects)
    if kind == "reach":
        s = rng.choice(subjects)
        last = scene.tracks[s][scene.observed - 1]
        cx, cy = centre(last)  # a region near the subject: the answer is not obvious from position alone
        half = rng.uniform(0.08, 0.15)
        x, y = (
            min(max(cx + rng.uniform(-0.35, 0.35), half), 1 - half),
            min(max(cy + rng.uniform(-0.35, 0.35), half), 1 - half),
        )
        region = (round(x - half, 2), round(y - half, 2), round(x + half, 2), round(y + half, 2))
        return Question("reach", (s,), answer(scene, "reach", (s,), region), region)
    if kind == "meet":
        pair = tuple(rng.sample(subjects, 2))
        return Question("meet", pair, answer(scene, "meet", pair))
    return Question("leave", (), answer(scene, "leave"))


def make_questions(
    rng: random.Random, count: int, *, kinds: Sequence[str] = QUESTION_KINDS, max_tries: int = 100000, **scene_options
) -> list[tuple[Scene, Question]]:
    """`count` (scene, question) pairs, kinds in turn, each kind's answers balanced (yes/no; for 'leave', each subject
    and 'none' about equally often; ties are redrawn)."""
    for kind in kinds:
        if kind not in QUESTION_KINDS:
            raise ValueError(f"unknown question kind {kind!r}; one of {QUESTION_KINDS}")
    out: list[tuple[Scene, Question]] = []
    seen: dict[tuple[str, str], int] = {}
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(f"could not draw {count} balanced questions in {max_tries} scenes")
        kind = kinds[len(out) % len(kinds)]
        scene = generate_scene(rng, **scene_options)
        question = _random_question(rng, scene, kind)
        if question.answer == "tie":
            continue
        options = 2 if kind != "leave" else len(scene.subjects) + 1
        quota = -(-count // (len(kinds) * options))
        if seen.get((kind, question.answer), 0) >= quota:
            continue
        seen[(kind, question.answer)] = seen.get((kind, question.answer), 0) + 1
        out.append((scene, question))
    return out


def make_splits(
    seed: int, sizes: Mapping[str, int] | None = None, **options
) -> dict[str, list[tuple[Scene, Question]]]:
    """Seeded train/validation/test splits of (scene, question) pairs (default sizes 400/50/100); each split draws
    its own scenes from its own RNG stream."""
    sizes = dict(sizes or {"train": 400, "validation": 50, "test": 100})
    return {name: make_questions(random.Random(f"{seed}:{name}"), n, **options) for name, n in sizes.items()}


# ---- rendering ------------------------------------------------------------------------------------------------------


def render(scene: Scene, frame: int, size: int | None = None) -> torch.Tensor:
    """Frame `frame` (0-based) as a [3, size, size] float image in [0, 1]: each subject a filled box in its colour."""
    if not 0 <= frame < scene.num_frames:
        raise ValueError(f"frame {frame} is outside the scene's frames 0..{scene.num_frames - 1}")
    size = scene.frame_size if size is None else size
    image = torch.zeros(3, size, size)
    for subject, track in scene.tracks.items():
        box = track[frame]
        if box is None:
            continue
        x1, y1, x2, y2 = (min(size - 1, int(v * size)) for v in box)
        colour = torch.tensor(COLOURS[(subject - 1) % len(COLOURS)])
        image[:, y1 : y2 + 1, x1 : x2 + 1] = colour[:, None, None]
    return image
