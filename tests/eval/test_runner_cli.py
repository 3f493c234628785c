"""The A/B runner's report (JSON + markdown) and the CLI's argument helpers."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from attnpatch.cli import LM_EVAL_TASKS, UsageError, _candidates, _eval_tasks, _options, _parser, main
from attnpatch.eval.metrics import pick
from attnpatch.eval.runner import evaluate
from attnpatch.eval.scoring import BatchedRows

from calibration_fixtures import planted_helpful_model, planted_items, word_tokenizer


def test_report_pairs_every_config_with_the_first(tmp_path):
    model, tok, items = planted_helpful_model(), word_tokenizer(), planted_items(8)
    configs = {
        "unpatched": None,
        "act": {"method": "act", "heads": {1: [2]}},
        "other head": {"method": "act", "heads": {0: [0]}},
    }
    report = evaluate(model, tok, {"planted": items}, configs=configs, batch_size=4, keep_items=True, progress=False)
    rows = report.results["planted"]
    assert report.metrics == ["acc", "acc_norm"] and rows["unpatched"]["n"] == 8
    for metric in report.metrics:
        assert "paired" not in rows["unpatched"][metric]
        other = rows["other head"][metric]["paired"]
        assert other["diff"] == 0.0 and other["p_mcnemar"] == 1.0 and other["p_holm"] == 1.0
        assert rows["act"][metric]["accuracy"] >= rows["unpatched"][metric]["accuracy"]
        act = rows["act"][metric]["paired"]
        assert act["p_holm"] == pytest.approx(min(1.0, 2 * act["p_mcnemar"]))  # 2 comparisons, "other head" has p=1
    # the per-item log-likelihoods give back both metrics' accuracies
    kept = report.items["planted"]
    assert kept["ids"] == [it.id for it in items] and kept["labels"] == [it.label for it in items]
    for name in configs:
        for metric in report.metrics:
            picks = [pick(lp, it.options, metric) for lp, it in zip(kept["logprobs"][name], items, strict=True)]
            right = [p == it.label for p, it in zip(picks, items, strict=True)]
            assert rows[name][metric]["accuracy"] == np.mean(right)
    json_path, md_path = report.save(str(tmp_path / "r"))
    saved = json.load(open(json_path))
    assert saved["average"]["acc"]["act"] == pytest.approx(report.average("act", "acc"))
    assert saved["average"]["acc_norm"]["act"] == pytest.approx(report.average("act"))
    assert set(saved["metric_definitions"]) == {"acc", "acc_norm"}
    text = open(md_path).read()
    assert text.startswith("**acc** (") and "\n**acc_norm** (" in text
    assert text.count("| task | n | unpatched | act | other head |") == 2 and text.count("| planted | 8 |") == 2
    only = evaluate(model, tok, {"planted": items}, configs=configs, batch_size=4, metrics=["acc"], progress=False)
    assert only.metrics == ["acc"] and "acc_norm" not in only.results["planted"]["act"]
    assert only.results["planted"]["act"]["acc"] == rows["act"]["acc"]
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(model, tok, {"planted": items}, metrics=["f1"], progress=False)


def test_cli_helpers():
    assert _options(["beta=0.5", 'heads={"2": [1]}', "name=x"]) == {"beta": 0.5, "heads": {"2": [1]}, "name": "x"}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        _options(["beta"])
    assert _candidates("3-5") == {3: "all", 4: "all", 5: "all"} and _candidates("all") == "all"
    args = _parser().parse_args(["calibrate", "--tasks", "sst2,copa", "--screen-layers", "2", "--limit", "4"])
    assert args.screen_layers == 2 and args.tasks == "sst2,copa" and args.limit == 4
    args = _parser().parse_args(["eval", "--profile", "p1", "--profile", "p2", "--option", "beta=0.3"])
    assert args.profile == ["p1", "p2"] and args.option == ["beta=0.3"]


def test_cli_metric_and_harness_arguments(capsys, tmp_path, monkeypatch):
    args = _parser().parse_args(["eval", "--harness", "lm-eval", "--metric", "acc", "--include-path", "d"])
    assert (args.harness, args.metric, args.include_path) == ("lm-eval", "acc", ["d"])
    assert _eval_tasks(args) == LM_EVAL_TASKS and LM_EVAL_TASKS.startswith("attnpatch_sst2,attnpatch_boolq,")
    args = _parser().parse_args(["eval", "--harness", "lm-eval", "--tasks", "mine"])
    assert _eval_tasks(args) == "mine" and _parser().parse_args(["eval"]).metric == "both"
    monkeypatch.chdir(tmp_path)
    for argv, message in [
        (["eval", "--harness", "lm-eval", "--include-path", "no/such"], "--include-path ['no/such'] is not a folder"),
        (["eval", "--harness", "lm-eval", "--task", "ocw"], "--harness lm-eval runs multiple-choice tasks"),
        (["eval", "--metric", "f1"], "invalid choice: 'f1'"),
        (["eval", "--harness", "lmeval"], "invalid choice: 'lmeval'"),
        (["eval", "--harness", "lm-eval", "--checkpoint", "c"], "--checkpoint resumes the attnpatch harness"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install lm-eval")
def test_cli_runs_lm_eval_on_the_patched_model(tmp_path, capsys):
    """`attnpatch eval --harness lm-eval`: a bundled task on Gemma-3 270M, unpatched and ACT, one metric."""
    out = tmp_path / "r"
    argv = ["eval", "--harness", "lm-eval", "--tasks", "attnpatch_copa", "--limit", "2", "--metric", "acc_norm"]
    assert main([*argv, "--out", str(out)]) == 0
    saved = json.load(open(f"{out}.json"))
    assert (saved["harness"], saved["metrics"], saved["tasks"]) == ("lm-eval", ["acc_norm"], ["attnpatch_copa"])
    assert set(saved["results"]["attnpatch_copa"]) == {"unpatched", "act"}
    act = saved["results"]["attnpatch_copa"]["act"]
    assert act["n"] == 2 and "paired" in act["acc_norm"] and "acc" not in act
    assert "**acc_norm**" in capsys.readouterr().out


def test_checkpoint_resumes_with_the_same_report_and_rescores_what_changed(tmp_path):
    model, tok, items = planted_helpful_model(), word_tokenizer(), planted_items(6)
    configs = {"unpatched": None, "act": {"method": "act", "heads": {1: [2]}}}
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    run = dict(configs=configs, batch_size=4, keep_items=True, progress=False, checkpoint=tmp_path)
    first = evaluate(model, tok, {"planted": items}, **run)
    scored = len(calls)
    assert scored > 0 and sorted(p.name for p in (tmp_path / "planted").iterdir()) == ["act.json", "unpatched.json"]
    again = evaluate(model, tok, {"planted": items}, **run)
    assert len(calls) == scored  # nothing scored again
    assert again.results == first.results and again.items == first.items and again.seconds == first.seconds
    # another configuration under the same name, or other items, is scored again and overwrites the file
    other = evaluate(model, tok, {"planted": items}, **{**run, "configs": {**configs, "act": {"method": "act"}}})
    assert len(calls) > scored
    rescored = len(calls)
    assert other.items["planted"]["logprobs"]["unpatched"] == first.items["planted"]["logprobs"]["unpatched"]
    fewer = evaluate(model, tok, {"planted": items[:4]}, **{**run, "configs": {"unpatched": None}})
    assert len(calls) > rescored
    assert fewer.items["planted"]["logprobs"]["unpatched"] == first.items["planted"]["logprobs"]["unpatched"][:4]
    hook.remove()


def test_an_interrupted_pass_resumes_batch_by_batch_with_the_same_scores(tmp_path):
    model, tok, items = planted_helpful_model(), word_tokenizer(), planted_items(12)
    configs = {"act": {"method": "act", "heads": {1: [2]}}}
    run = dict(configs=configs, batch_size=2, keep_items=True, progress=False)
    whole = evaluate(model, tok, {"planted": items}, **run)
    batches = {size: len(BatchedRows(model, tok, items, size).batches) for size in (2, 3)}
    assert batches[2] > 4

    class Stop(Exception):
        pass

    calls = []

    def forward(*_):
        calls.append(1)
        if len(calls) == 4:  # the fourth batch never finishes
            raise Stop

    hook = model.register_forward_pre_hook(forward)
    with pytest.raises(Stop):
        evaluate(model, tok, {"planted": items}, **run, checkpoint=tmp_path, save_every=0.0)
    hook.remove()
    partial_path = tmp_path / "planted" / "act.partial.json"
    partial = json.loads(partial_path.read_text())
    assert len(partial["batches"]) == 3 and partial["key"]["batch_size"] == 2
    calls.clear()
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    resumed = evaluate(model, tok, {"planted": items}, **run, checkpoint=tmp_path, save_every=0.0)
    assert len(calls) == batches[2] - 3  # only the batches after the saved ones
    assert resumed.items == whole.items and resumed.results == whole.results
    assert not partial_path.exists() and (tmp_path / "planted" / "act.json").exists()
    # another batch size makes other batches: the saved ones are not taken
    (tmp_path / "planted" / "act.json").unlink()
    partial_path.write_text(json.dumps(partial))
    calls.clear()
    other = evaluate(model, tok, {"planted": items}, **{**run, "batch_size": 3}, checkpoint=tmp_path)
    hook.remove()
    assert len(calls) == batches[3]
    assert other.results == whole.results
