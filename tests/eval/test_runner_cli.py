"""The A/B runner's report (JSON + markdown) and the CLI's argument helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnpatch.cli import UsageError, _candidates, _options, _parser
from attnpatch.eval.metrics import pick
from attnpatch.eval.runner import evaluate

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
