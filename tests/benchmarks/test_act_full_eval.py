"""The whole-eval ACT benchmark adds a configuration to saved reports without scoring their configurations again, and
refuses saved reports of other items or of another profile."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import act_full_eval  # noqa: E402

from attnpatch.eval.runner import evaluate  # noqa: E402

from calibration_fixtures import planted_helpful_model, planted_items, word_tokenizer  # noqa: E402


def test_a_saved_report_gains_a_configuration_and_keeps_the_scores_of_the_others(tmp_path):
    model, tok, items = planted_helpful_model(), word_tokenizer(), planted_items(6)
    first = {"unpatched": None, "act": {"method": "act", "heads": {1: [2]}}}
    run = dict(batch_size=4, keep_items=True, progress=False)
    saved = json.loads(json.dumps(evaluate(model, tok, {"planted": items}, configs=first, **run).to_dict()))
    saved["items"]["planted"]["logprobs"]["act"][0][0] -= 1.0  # a mark: what is taken comes from the report
    configs = {**first, "other head": {"method": "act", "heads": {0: [0]}}}
    folder = str(tmp_path / "checkpoint")
    assert act_full_eval.seed_checkpoint(saved, "planted", items, configs, folder) == ["unpatched", "act"]
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    report = evaluate(model, tok, {"planted": items}, configs=configs, checkpoint=folder, **run)
    seeded = len(calls)
    kept = report.items["planted"]["logprobs"]
    for name in first:
        assert kept[name] == saved["items"]["planted"]["logprobs"][name]
        assert report.seconds[f"planted/{name}"] == saved["seconds"][f"planted/{name}"]
    alone = evaluate(model, tok, {"planted": items}, configs={"other head": configs["other head"]}, **run)
    hook.remove()
    assert kept["other head"] == alone.items["planted"]["logprobs"]["other head"]
    assert seeded > 0 and len(calls) == 2 * seeded  # the seeded run scored one configuration, as many batches
    with pytest.raises(SystemExit, match="other items"):
        act_full_eval.seed_checkpoint(saved, "planted", items[1:], configs, folder)


def test_saved_reports_of_another_profile_are_refused(tmp_path):
    (tmp_path / "piqa.json").write_text("{}")
    record = {"path": "a", "heads": {"6": [2], "7": [1]}}
    (tmp_path / "profile.json").write_text(json.dumps(record))
    act_full_eval.check_saved_profile(str(tmp_path), json.loads(json.dumps(record)))
    with pytest.raises(SystemExit, match="--add-profile"):
        act_full_eval.check_saved_profile(str(tmp_path), {"path": "b", "heads": {"9": [1], "16": [3]}})
    (tmp_path / "piqa.json").unlink()  # nothing scored yet: any profile may start the folder
    act_full_eval.check_saved_profile(str(tmp_path), {"path": "b", "heads": {"9": [1]}})


def test_calibration_compute_counts_the_candidates_a_run_resumed():
    seconds = dict(total=100.0, screening=300.0, per_candidate=20.0, candidates=2)
    screen = [{"layer": 1}, {"layer": 2}]
    assert act_full_eval._compute_seconds({"resumed": 0, "seconds": seconds, "layer_screen": screen}) == 100.0
    every = {"resumed": 4, "seconds": seconds, "layer_screen": screen}
    assert act_full_eval._compute_seconds(every) == 100.0 + 300.0 + 2 * 20.0
    assert act_full_eval._compute_seconds({"resumed": 1, "seconds": seconds, "layer_screen": screen}) is None
    recorded = {"resumed": 1, "seconds": {**seconds, "compute": 123.0}, "layer_screen": screen}
    assert act_full_eval._compute_seconds(recorded) == 123.0


def test_a_share_writes_an_interim_report_only_with_the_reference_and_never_over_a_fuller_one():
    share = ["unpatched", "act default heads"]
    assert act_full_eval.share_reports(share, None)
    assert act_full_eval.share_reports(share, {"configs": {"unpatched": None}})
    assert not act_full_eval.share_reports(["act default heads"], None)  # nothing to compare it with
    assert not act_full_eval.share_reports(["unpatched"], None)
    fuller = {"configs": {"unpatched": None, "act default heads": {}, "act profile": {}}}
    assert not act_full_eval.share_reports(share, fuller)  # writing would drop "act profile"


def test_an_interim_task_shows_its_missing_configurations_as_not_yet():
    def row(task, config):
        return dict(model="m", task=task, config=config, metric="acc", n=10, diff=0.1, diff_ci=[0.0, 0.2],
                    p_mcnemar=0.5, survives_holm=False, survives_bh=False)  # fmt: skip

    summary = {
        "accuracy": {"m": {"done": {"unpatched": {"acc": 0.5}}, "interim": {"unpatched": {"acc": 0.4}}}},
        "comparisons": [row("done", "a"), row("done", "b"), row("interim", "a")],
    }
    lines = act_full_eval.model_tables(summary).splitlines()
    assert lines[-2].startswith("| done | 10 | 0.500 | +10.0") and "not yet" not in lines[-2]
    assert lines[-1].startswith("| interim | 10 | 0.400 | +10.0") and lines[-1].endswith("| not yet |")
