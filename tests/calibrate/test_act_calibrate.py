"""Calibration: replayed layers equal a full forward, the planted helpful head is found, profiles round-trip and
refuse other models, and a checkpointed run resumes."""

from __future__ import annotations

import json

import pytest
import torch

import attnpatch
from attnpatch.calibrate.replay import Replay
from attnpatch.eval.metrics import continuation_length
from attnpatch.eval.scoring import option_logprobs
from attnpatch.profiles import Profile, ProfileError

from calibration_fixtures import HELPFUL, planted_helpful_model, planted_items, word_tokenizer
from tiny_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_replay_from_a_layer_equals_full_forward(family):
    model = tiny_model(family)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    replay = Replay(model)
    with torch.no_grad():
        full = model(ids).logits
        for layer in (1, 3):
            store: list = []
            with replay.capture_input(layer, store):
                model(ids)
            assert len(store) == 1
            with replay.start_at(layer, store[0]):
                again = model(torch.zeros_like(ids)).logits  # the ids are ignored below `layer`... mostly
            assert again.shape == full.shape
            with replay.start_at(layer, store[0]):
                again = model(ids).logits
            assert (again - full).abs().max() <= 1e-5
    assert all("forward" not in layer.__dict__ for layer in replay.layers), "layers are restored"


@pytest.fixture(scope="module")
def planted():
    return planted_helpful_model(), word_tokenizer(), planted_items()


def test_calibration_finds_the_planted_head(planted):
    model, tok, items = planted
    profile = attnpatch.calibrate(model, tok, items, candidates="all", progress=False, batch_size=4)
    assert profile.heads == {HELPFUL[0]: [HELPFUL[1]]}
    meta = profile.metadata
    assert meta["calibrated"]["score"] > meta["baseline"]["score"]
    others = [c for c in meta["candidates"] if (c["layer"], c["head"]) != HELPFUL]
    assert len(others) == 4 * 4 - 1 and all(c["delta"] == 0 for c in others)
    assert profile.tensors["per_head_delta"][HELPFUL] > 0


def test_replayed_scores_equal_a_plain_patched_run(planted):
    """The candidate score computed with replayed lower layers equals applying ACT to the whole model."""
    model, tok, items = planted
    profile = attnpatch.calibrate(model, tok, items, candidates={1: [2]}, progress=False, batch_size=4)
    base = option_logprobs(model, tok, items, progress=False)
    with attnpatch.patched(model, "act", heads={1: [2]}):
        act = option_logprobs(model, tok, items, progress=False)

    def score(lps, item):
        lengths = [continuation_length(o) for o in item.options]  # acc_norm's: without the leading space
        norm = torch.tensor([lp / n for lp, n in zip(lps, lengths, strict=True)], dtype=torch.float64)
        return float(torch.log_softmax(norm, 0)[item.label])

    expected = sum(score(a, i) - score(b, i) for a, b, i in zip(act, base, items, strict=True)) / len(items)
    assert profile.metadata["candidates"][0]["delta"] == pytest.approx(expected, abs=1e-6)


def test_profile_round_trip_and_apply(planted, tmp_path):
    model, tok, items = planted
    profile = attnpatch.calibrate(model, tok, items, candidates={1: "all"}, progress=False, batch_size=4)
    profile.save(tmp_path / "p")
    loaded = Profile.load(tmp_path / "p")
    assert loaded.heads == profile.heads and loaded.options == profile.options
    assert torch.equal(loaded.tensors["per_head_delta"].nan_to_num(), profile.tensors["per_head_delta"].nan_to_num())
    ids = tok([items[0].context], return_tensors="pt").input_ids
    with torch.no_grad(), attnpatch.patched(model, "act", heads={1: [2]}):
        expected = model(ids).logits
    for source in (tmp_path / "p", loaded):
        with torch.no_grad(), attnpatch.patched(model, "act", profile=source) as patch:
            assert patch.selected_layers == {1}
            assert torch.equal(model(ids).logits, expected)


def test_profile_refuses_other_models_methods_and_corrupt_files(planted, tmp_path):
    model, tok, items = planted
    profile = attnpatch.calibrate(model, tok, items, candidates={1: [2]}, progress=False, batch_size=4)
    profile.save(tmp_path / "p")
    with pytest.raises(ProfileError, match="weights"):
        attnpatch.apply(tiny_model("llama"), "act", profile=tmp_path / "p")
    with pytest.raises(ProfileError, match="num_layers|architecture"):
        attnpatch.apply(tiny_model("gemma3"), "act", profile=tmp_path / "p")
    with pytest.raises(ProfileError, match="method 'act', not 'var'"):
        profile.check(model, "var")
    config = tmp_path / "p" / "attnpatch_config.json"
    config.write_text("{not json")
    with pytest.raises(ProfileError, match="corrupt profile"):
        Profile.load(tmp_path / "p")
    config.write_text(json.dumps({"format_version": 1, "method": "act", "options": {}, "heads": {"x": [1]}}))
    with pytest.raises(ProfileError, match="heads must map"):
        Profile.load(tmp_path / "p")
    (tmp_path / "p" / "attnpatch_config.json").unlink()
    with pytest.raises(ProfileError, match="missing"):
        Profile.load(tmp_path / "p")
    profile.save(tmp_path / "q")
    (tmp_path / "q" / "attnpatch_state.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ProfileError, match="corrupt profile tensors"):
        Profile.load(tmp_path / "q")


def test_checkpoint_resumes(planted, tmp_path):
    model, tok, items = planted
    path = str(tmp_path / "cal.jsonl")
    first = attnpatch.calibrate(model, tok, items, candidates={1: "all"}, checkpoint=path, progress=False)
    lines = open(path).read().splitlines()
    assert len(lines) == 1 + 4
    second = attnpatch.calibrate(model, tok, items, candidates={1: "all"}, checkpoint=path, progress=False)
    assert second.metadata["resumed"] == 4 and first.metadata["resumed"] == 0
    assert second.heads == first.heads and second.metadata["candidates"] == first.metadata["candidates"]
    assert len(open(path).read().splitlines()) == 1 + 4
    # the resumed run counts its candidates' compute as the first run measured it, beside its own wall time
    measured = sum(json.loads(line)["seconds"] for line in lines[1:])
    once, again = first.metadata["seconds"], second.metadata["seconds"]
    assert once["resumed"] == 0 and once["compute"] == once["total"]
    assert again["resumed"] == pytest.approx(measured) and again["compute"] == pytest.approx(again["total"] + measured)


def test_unknown_calibration_method():
    with pytest.raises(ValueError, match="calibratable methods"):
        attnpatch.calibrate(None, None, [], method="nope")


def test_layer_screening_then_heads(planted):
    model, tok, items = planted
    profile = attnpatch.calibrate(model, tok, items, candidates="all", screen_layers=1, progress=False, batch_size=4)
    assert profile.heads == {HELPFUL[0]: [HELPFUL[1]]}
    screen = profile.metadata["layer_screen"]
    assert [s["layer"] for s in screen] == [0, 1, 2, 3]
    assert [s["delta"] > 0 for s in screen] == [False, True, False, False]
    assert {c["layer"] for c in profile.metadata["candidates"]} == {HELPFUL[0]}
