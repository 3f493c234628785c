"""Trajectory text: identity tags and quantised normalised boxes per frame, and a strict parser.

    <id1> f3 [12,34,20,42] f4 [14,35,22,43]; <id2> f3 [50,60,58,68] f4 out

Coordinates are normalised to [0, 1] and written as integers in [0, bins] (bins=100: hundredths); frames count from
1; `out` means the subject has left the view from that frame on; subjects are separated by ';'. The parser never
raises on model output: a subject segment that does not follow the grammar exactly, a duplicate, a box out of range or
with x1 > x2 is dropped and counted as malformed (its boxes are then scored as missing).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .scenes import Box, Scene, check_box, tag

OUT = "out"
Track = dict[int, Box | None]  # 0-based frame -> box, None = predicted out of view
MAX_CHARS = 20000  # longer outputs are cut before parsing (a runaway generation costs no more than this)

_TAG = re.compile(r"<id(\d{1,3})>")
_FRAME = re.compile(r"f(\d{1,3})")
_BOX = re.compile(r"\[(\d{1,4}),(\d{1,4}),(\d{1,4}),(\d{1,4})\]")


def quantise(value: float, bins: int) -> int:
    return int(round(value * bins))


def format_box(box: Box, bins: int = 100) -> str:
    return "[" + ",".join(str(quantise(v, bins)) for v in box) + "]"


def format_track(subject: int, track: Mapping[int, Box | None], bins: int = 100) -> str:
    """`<idS> fN [..] ...` for the frames of `track` in order (0-based keys written 1-based); after a None, 'out'."""
    parts = [tag(subject)]
    for frame in sorted(track):
        box = track[frame]
        if box is None:
            parts.append(f"f{frame + 1} {OUT}")
            break
        parts.append(f"f{frame + 1} {format_box(box, bins)}")
    return " ".join(parts)


def format_trajectories(tracks: Mapping[int, Mapping[int, Box | None]], bins: int = 100) -> str:
    """Several subjects' tracks, in the order given, joined by '; '."""
    return "; ".join(format_track(s, t, bins) for s, t in tracks.items())


def scene_tracks(scene: Scene, subjects: tuple[int, ...] | None, frames: range) -> dict[int, Track]:
    """The boxes of `subjects` (None: all) over `frames` (0-based), stopping after a subject's first None."""
    out: dict[int, Track] = {}
    for s in scene.subjects if subjects is None else subjects:
        scene.check_subject(s)
        track: Track = {}
        for f in frames:
            track[f] = scene.tracks[s][f]
            if track[f] is None:
                break
        out[s] = track
    return out


@dataclass
class Parsed:
    """tracks: subject -> 0-based frame -> box (None: predicted out); segments / malformed: subject segments seen and
    dropped; ok: the text parsed completely (no malformed segment, at least one subject)."""

    tracks: dict[int, Track] = field(default_factory=dict)
    segments: int = 0
    malformed: int = 0

    @property
    def ok(self) -> bool:
        return self.segments > 0 and self.malformed == 0


def _parse_segment(text: str, bins: int) -> tuple[int, Track] | None:
    words = text.split()
    if len(words) < 2 or not (m := _TAG.fullmatch(words[0])):
        return None
    subject = int(m.group(1))
    if subject < 1:
        return None
    track: Track = {}
    rest = words[1:]
    if len(rest) % 2:
        return None
    for i in range(0, len(rest), 2):
        fm = _FRAME.fullmatch(rest[i])
        if not fm or int(fm.group(1)) < 1:
            return None
        frame = int(fm.group(1)) - 1
        if frame in track or (track and frame < max(track)) or (track and None in track.values()):
            return None  # frames repeat, go backwards, or follow 'out'
        if rest[i + 1] == OUT:
            track[frame] = None
            continue
        bm = _BOX.fullmatch(rest[i + 1])
        if not bm:
            return None
        values = [int(v) / bins for v in bm.groups()]
        try:
            track[frame] = check_box(values, "parsed box")
        except ValueError:
            return None
    return subject, track


def parse_trajectories(text: str, bins: int = 100) -> Parsed:
    """Parse trajectory text strictly (see the module docstring); never raises on a string."""
    result = Parsed()
    if not isinstance(text, str):
        return result
    for segment in text[:MAX_CHARS].split(";"):
        if not segment.strip():
            continue
        result.segments += 1
        parsed = _parse_segment(segment, bins)
        if parsed is None or parsed[0] in result.tracks:
            result.malformed += 1
            continue
        result.tracks[parsed[0]] = parsed[1]
    return result


ANSWER = "Answer:"
TRAJECTORIES = "Trajectories:"
_ANSWER_WORD = re.compile(r"(yes|no|none|<id\d{1,3}>)")


@dataclass
class Response:
    """A parsed model response: trajectories (None when none were written) and the answer (None: missing)."""

    trajectories: Parsed | None
    answer: str | None


def parse_response(text: str, bins: int = 100) -> Response:
    """Split `Trajectories: ...\\nAnswer: X` (either part optional); the answer must be one word of yes, no, none or
    an identity tag, else it is missing. Never raises on a string."""
    if not isinstance(text, str):
        return Response(None, None)
    text = text[:MAX_CHARS]
    head, sep, tail = text.partition(ANSWER)
    answer = None
    if sep:
        words = tail.split()
        if words and _ANSWER_WORD.fullmatch(words[0].rstrip(".")):
            answer = words[0].rstrip(".")
    trajectories = None
    body = head.strip()
    if body.startswith(TRAJECTORIES):
        trajectories = parse_trajectories(body[len(TRAJECTORIES) :], bins)
    elif body:
        trajectories = parse_trajectories(body, bins)
    return Response(trajectories, answer)
