"""Foresight data and scoring (no model): trajectory text round trip and hostile output, task builders on a constructed
scene, loss masks, metrics on hand-computed cases, the scene generator, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from attnpatch.adapters.foresight import (
    CharTokenizer,
    Question,
    Scene,
    answer,
    answer_accuracy,
    collate,
    constant_velocity,
    detect_track_task,
    encode,
    format_trajectories,
    fpt_tasks,
    make_splits,
    parse_rate,
    parse_response,
    parse_trajectories,
    question_task,
    render,
    score_trajectory,
    summarise,
    track_task,
)
from attnpatch.adapters.foresight.metrics import displacement, iou

# subject 1 moves right by 0.1 per frame; subject 2 drifts to the corner and leaves the view at frame 4 (index 3)
A = [(0.1, 0.1, 0.2, 0.2), (0.2, 0.1, 0.3, 0.2), (0.3, 0.1, 0.4, 0.2), (0.4, 0.1, 0.5, 0.2), (0.5, 0.1, 0.6, 0.2)]
B = [(0.8, 0.8, 0.9, 0.9), (0.85, 0.85, 0.95, 0.95), (0.9, 0.9, 1.0, 1.0), None, None]
OBSERVED = "Observed: <id1> f1 [10,10,20,20] f2 [20,10,30,20]; <id2> f1 [80,80,90,90] f2 [85,85,95,95]\n"
A_FUTURE = "<id1> f3 [30,10,40,20] f4 [40,10,50,20] f5 [50,10,60,20]"
B_FUTURE = "<id2> f3 [90,90,100,100] f4 out"


@pytest.fixture
def scene() -> Scene:
    return Scene({1: A, 2: B}, observed=2, names={1: "red square", 2: "green square"})


# ---- trajectory text ------------------------------------------------------------------------------------------------


def test_format_and_parse_round_trip(scene):
    tracks = {1: dict(enumerate(A)), 2: {0: B[0], 1: B[1], 2: B[2], 3: None}}
    text = format_trajectories(tracks)
    assert text == (
        "<id1> f1 [10,10,20,20] f2 [20,10,30,20] f3 [30,10,40,20] f4 [40,10,50,20] f5 [50,10,60,20]; "
        "<id2> f1 [80,80,90,90] f2 [85,85,95,95] f3 [90,90,100,100] f4 out"
    )
    parsed = parse_trajectories(text)
    assert parsed.ok and parsed.segments == 2 and parsed.malformed == 0
    assert set(parsed.tracks) == {1, 2}
    for s, track in tracks.items():
        assert parsed.tracks[s].keys() == track.keys()
        for f, box in track.items():
            assert (box is None) == (parsed.tracks[s][f] is None)
            if box is not None:
                assert parsed.tracks[s][f] == pytest.approx(box, abs=1e-9)
    # bins: coordinates in tenths
    assert format_trajectories({1: {0: (0.12, 0.5, 0.34, 0.71)}}, bins=10) == "<id1> f1 [1,5,3,7]"
    assert parse_trajectories("<id1> f1 [1,5,3,7]", bins=10).tracks[1][0] == (0.1, 0.5, 0.3, 0.7)


HOSTILE = [
    "",
    "   ",
    "garbage",
    "<id1>",
    "<id1> f3",
    "<id1> f3 [1,2,3]",
    "<id1> f3 [10,20,5,30]",  # x1 > x2
    "<id1> f3 [10,20,30,400]",  # beyond the bins
    "<id1> f3 [-1,2,3,4]",
    "<id1> f3 [1.5,2,3,4]",
    "<id1> f3 [1, 2, 3, 4]",  # spaces inside the box
    "<id1> f0 [1,2,3,4]",
    "<id1> f3 [1,2,3,4] f3 [1,2,3,4]",  # a repeated frame
    "<id1> f4 [1,2,3,4] f3 [1,2,3,4]",  # frames backwards
    "<id1> f3 out f4 [1,2,3,4]",  # back after leaving
    "<id0> f1 [1,2,3,4]",
    "<idx> f1 [1,2,3,4]",
    "<id1> f3 [1,2,3,4",  # cut off
    "<id1> f3 [99999999999999999999,2,3,4]",
    "<id1> f99999 [1,2,3,4]",
    "[" * 50000,
    "<id1> f3 " + "[1,2,3,4] " * 10000,
    "\x00\uffff<id1>\u200b f3 [1,2,3,4]",
    "<id1> f3 [1,2,3,4]<eos><pad>",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_output_is_missing_never_a_crash(text):
    parsed = parse_trajectories(text)
    assert not parsed.ok and parsed.tracks == {}
    response = parse_response(text)
    assert response.answer is None


def test_partly_malformed_output_keeps_the_good_segments():
    parsed = parse_trajectories("<id1> f3 [10,10,20,20]; junk; <id2> f3 out; <id1> f4 [1,1,2,2]")
    assert set(parsed.tracks) == {1, 2} and parsed.tracks[2] == {2: None}
    assert parsed.segments == 4 and parsed.malformed == 2 and not parsed.ok  # junk, and <id1> repeated
    assert parse_trajectories(None).tracks == {} and parse_trajectories(b"<id1> f1 [1,1,2,2]").segments == 0


def test_parse_response():
    r = parse_response("Trajectories: <id1> f3 [30,10,40,20]\nAnswer: yes")
    assert r.answer == "yes" and r.trajectories.ok and r.trajectories.tracks[1][2] == (0.3, 0.1, 0.4, 0.2)
    assert parse_response("Answer: <id2>.").answer == "<id2>"
    assert parse_response("Answer: none\nAnswer: yes").answer == "none"
    assert parse_response("Answer: no").trajectories is None
    for bad in ("Answer: maybe", "Answer:", "Answer: yesno", "Answer: <id>", "yes", None, 3):
        assert parse_response(bad).answer is None
    r = parse_response("Trajectories: <id1> f3 [30,10\nAnswer: no")
    assert r.answer == "no" and not r.trajectories.ok


# ---- builders and loss masks ----------------------------------------------------------------------------------------


def test_builders_give_exactly_the_expected_targets(scene):
    t = track_task(scene, 1)
    assert (t.kind, t.prompt, t.target) == ("track", OBSERVED + "Track <id1>:\n", A_FUTURE)
    assert t.subjects == (1,) and t.target_frames == (2, 3, 4) and t.frames == ()
    t = detect_track_task(scene)
    assert (t.prompt, t.target) == (OBSERVED + "Track all:\n", A_FUTURE + "; " + B_FUTURE)

    meet = Question("meet", (1, 2), answer(scene, "meet", (1, 2)))
    assert meet.answer == "no"
    t = question_task(scene, meet, "fit")
    assert t.prompt == OBSERVED + "Question: Will <id1> and <id2> meet?\n"
    assert t.target == f"Trajectories: {A_FUTURE}; {B_FUTURE}\nAnswer: no"
    t = question_task(scene, meet, "answer")
    assert (t.prompt, t.target) == (OBSERVED + "Question: Will <id1> and <id2> meet?\n", "Answer: no")

    region = (0.45, 0.0, 0.6, 0.3)  # subject 1's centre reaches x = 0.45 at f4
    reach = Question("reach", (1,), answer(scene, "reach", (1,), region), region)
    assert reach.answer == "yes" and answer(scene, "reach", (2,), region) == "no"
    t = question_task(scene, reach, "fit")
    assert t.prompt.endswith("Question: Will <id1> reach [45,0,60,30]?\n")
    assert t.target == f"Trajectories: {A_FUTURE}\nAnswer: yes"

    leave = Question("leave", (), answer(scene, "leave"))
    assert leave.answer == "<id2>"
    t = question_task(scene, leave, "fit")
    assert t.target == f"Trajectories: {A_FUTURE}; {B_FUTURE}\nAnswer: <id2>"
    assert answer(Scene({1: A}, observed=2), "leave") == "none"
    assert len(fpt_tasks([scene, scene])) == 6


def test_images_mode_renders_the_observed_frames(scene):
    t = track_task(scene, 2, mode="images")
    assert t.prompt == "Frames: f1 <image> f2 <image>\nSubjects: <id1> red square, <id2> green square\nTrack <id2>:\n"
    assert t.target == "<id2> f1 [80,80,90,90] f2 [85,85,95,95] f3 [90,90,100,100] f4 out"  # detect, then track
    assert len(t.frames) == 2 and t.frames[0].shape == (3, 32, 32)
    frame = render(scene, 0)
    assert torch.equal(frame[:, 3, 3], torch.tensor([1.0, 0.2, 0.2]))  # subject 1, red, at (0.1..0.2)
    assert torch.equal(frame[:, 27, 27], torch.tensor([0.2, 0.9, 0.2]))  # subject 2, green
    assert frame[:, 15, 15].abs().sum() == 0
    assert render(scene, 4)[:, 27, 27].abs().sum() == 0  # subject 2 has left


@pytest.mark.parametrize("kind", ["track", "fit", "answer"])
def test_loss_masks_cover_only_the_target(scene, kind):
    tok = CharTokenizer()
    q = Question("leave", (), answer(scene, "leave"))
    task = track_task(scene, 1) if kind == "track" else question_task(scene, q, kind)
    row = encode(task, tok)
    prompt_len = 1 + len(task.prompt)  # BOS + one id per character
    assert row.input_ids[0] == tok.bos_token_id and row.input_ids[-1] == tok.eos_token_id
    assert row.labels[:prompt_len] == [-100] * prompt_len
    assert row.labels[prompt_len:] == row.input_ids[prompt_len:]
    assert tok.decode(row.labels[prompt_len:]) == task.target
    prompt_only = encode(task, tok, with_target=False)
    assert prompt_only.input_ids == row.input_ids[:prompt_len] and set(prompt_only.labels) == {-100}


def test_image_tokens_and_collate(scene):
    tok = CharTokenizer()
    tasks = [track_task(scene, 1, mode="images"), detect_track_task(scene, mode="images")]
    rows = [encode(t, tok, image_token_id=5, tokens_per_image=16) for t in tasks]
    for t, row in zip(tasks, rows, strict=True):
        assert row.input_ids.count(5) == 32
        assert all(lab == -100 for i, lab in zip(row.input_ids, row.labels, strict=True) if i == 5)
        assert tok.decode([x for x in row.labels if x != -100]) == t.target
    for side in ("left", "right"):
        batch = collate(rows, tok.pad_token_id, side=side)
        width = max(len(r.input_ids) for r in rows)
        assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
        assert batch["attention_mask"].sum(1).tolist() == [len(r.input_ids) for r in rows]
        assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()
        short = 0 if len(rows[0].input_ids) < len(rows[1].input_ids) else 1
        assert batch["attention_mask"][short, 0 if side == "left" else -1] == 0


# ---- metrics --------------------------------------------------------------------------------------------------------


def test_metrics_on_hand_computed_cases():
    assert iou((0, 0, 0.2, 0.2), (0.1, 0, 0.3, 0.2)) == pytest.approx(1 / 3)
    assert iou((0, 0, 0.1, 0.1), (0.5, 0.5, 0.6, 0.6)) == 0.0
    assert displacement((0, 0, 0.2, 0.2), (0.03, 0.04, 0.23, 0.24)) == pytest.approx(0.05)
    truth = {2: (0.0, 0.0, 0.2, 0.2), 3: (0.1, 0.0, 0.3, 0.2), 4: (0.2, 0.0, 0.4, 0.2)}
    pred = {2: (0.03, 0.04, 0.23, 0.24), 4: (0.2, 0.0, 0.4, 0.2)}  # frame 3 missing
    s = score_trajectory(1, pred, truth)
    assert s.ade == pytest.approx(0.025) and s.fde == pytest.approx(0.0)
    assert s.ious[1:] == [0.0, 1.0] and s.ious[0] == pytest.approx(0.17 * 0.16 / (0.08 - 0.17 * 0.16))
    assert (s.expected, s.predicted) == (3, 2)
    # truth leaves at frame 4: FDE at frame 3; nothing predicted there -> no FDE
    s = score_trajectory(1, {2: truth[2], 4: truth[4]}, {2: truth[2], 3: truth[3], 4: None})
    assert s.ade == 0.0 and s.fde is None and s.exit_true and not s.exit_predicted and s.ious == [1.0, 0.0]
    s = score_trajectory(1, None, truth)
    assert s.ade is None and s.fde is None and s.ious == [0.0, 0.0, 0.0]
    summary = summarise([score_trajectory(1, pred, truth), score_trajectory(2, {}, truth)])
    assert summary["ade"] == pytest.approx(0.025) and summary["with_ade"] == 1 and summary["coverage"] == 2 / 6
    assert summary["mean_iou_per_frame"][2] == pytest.approx(0.5)
    assert answer_accuracy(["yes", None, "no"], ["yes", "no", "no"]) == pytest.approx(2 / 3)
    assert parse_rate([True, False, True, True]) == 0.75


def test_constant_velocity_baseline(scene):
    cv = constant_velocity(scene)
    for f, box in zip((2, 3, 4), A[2:], strict=True):  # subject 1 moves at constant velocity: exact
        assert cv[1][f] == pytest.approx(box)
    assert cv[2][2] == pytest.approx((0.9, 0.9, 1.0, 1.0))  # centre 0.95, clipped
    assert cv[2][3] == pytest.approx((0.95, 0.95, 1.0, 1.0))  # centre 1.0: still in view
    assert cv[2][4] is None  # centre 1.05: out
    assert constant_velocity(Scene({1: A}, observed=1))[1][1] == pytest.approx(A[0])  # one frame: standing still


# ---- generator ------------------------------------------------------------------------------------------------------


def test_generator_is_seeded_balanced_and_split():
    a = make_splits(3, {"train": 30, "validation": 6, "test": 12})
    b = make_splits(3, {"train": 30, "validation": 6, "test": 12})
    assert {k: len(v) for k, v in a.items()} == {"train": 30, "validation": 6, "test": 12}
    assert [(s.tracks, q) for s, q in a["test"]] == [(s.tracks, q) for s, q in b["test"]]
    assert [s.tracks for s, _ in a["test"]] != [s.tracks for s, _ in make_splits(4, {"test": 12})["test"]]
    assert a["train"][0][0].tracks != a["test"][0][0].tracks
    kinds = [q.kind for _, q in a["train"]]
    assert kinds.count("reach") == kinds.count("meet") == kinds.count("leave") == 10
    for kind in ("reach", "meet"):
        answers = [q.answer for _, q in a["train"] if q.kind == kind]
        assert answers.count("yes") == answers.count("no") == 5
    for scene, q in a["train"]:
        assert answer(scene, q.kind, q.subjects, q.region) == q.answer
        assert all(scene.tracks[s][scene.observed - 1] is not None for s in scene.subjects)
    scenes = make_splits(0, {"test": 3}, subjects=3, observed=3, future=2)["test"]
    assert all(s.num_frames == 5 and s.observed == 3 and len(s.subjects) == 3 for s, _ in scenes)
    assert random.Random(0).random() == random.Random(0).random()


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_input(scene):
    with pytest.raises(ValueError, match=r"subject <id1> frame f2: box \(0.2, 0.1, 1.3, 0.2\) lies outside \[0, 1\]"):
        Scene({1: [A[0], (0.2, 0.1, 1.3, 0.2)]}, observed=1)
    with pytest.raises(ValueError, match=r"subject <id2> frame f1: box .* has x1 > x2"):
        Scene({1: A[:2], 2: [(0.5, 0.1, 0.4, 0.2), B[1]]}, observed=1)
    with pytest.raises(ValueError, match="track lengths differ"):
        Scene({1: A, 2: B[:3]}, observed=1)
    with pytest.raises(ValueError, match="does not come back"):
        Scene({1: [A[0], None, A[2]]}, observed=1)
    with pytest.raises(ValueError, match=r"observed must lie in \[1, 4\]"):
        Scene({1: A}, observed=5)
    with pytest.raises(ValueError, match=r"subject <id3> is not in the scene \(its subjects: <id1>, <id2>\)"):
        track_task(scene, 3)
    with pytest.raises(ValueError, match=r"question subject <id7> is not in the scene"):
        question_task(scene, Question("meet", (1, 7), "no"))
    with pytest.raises(ValueError, match=r"question subject <id9> is not in the scene"):
        answer(scene, "reach", (9,), (0, 0, 1, 1))
    with pytest.raises(ValueError, match=r"question region: box .* outside \[0, 1\]"):
        answer(scene, "reach", (1,), (0.5, 0.5, 1.5, 1.0))
    with pytest.raises(ValueError, match=r"subject <id4> is not in the scene"):
        constant_velocity(scene, [4])
    task = track_task(scene, 1, mode="images")
    mixed = dataclasses.replace(task, frames=(render(scene, 0), render(scene, 1, size=16)))
    with pytest.raises(ValueError, match=r"task 7: frames of different sizes in one sequence \(frame 0: 3x32x32, "):
        encode(mixed, CharTokenizer(), image_token_id=5, tokens_per_image=16, where="task 7")
    with pytest.raises(ValueError, match="2 <image> markers but 1 frames"):
        encode(dataclasses.replace(task, frames=task.frames[:1]), CharTokenizer(), image_token_id=5, tokens_per_image=4)
    with pytest.raises(ValueError, match="needs image_token_id"):
        encode(task, CharTokenizer())
    with pytest.raises(ValueError, match="mode must be one of"):
        track_task(scene, 1, mode="video")
    with pytest.raises(ValueError, match="CharTokenizer cannot encode"):
        CharTokenizer().encode("Ünïcode")
