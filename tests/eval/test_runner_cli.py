"""The A/B runner's report (JSON + markdown) and the CLI's argument helpers."""

from __future__ import annotations

import json

import pytest

from attnpatch.cli import UsageError, _candidates, _options, _parser
from attnpatch.eval.runner import evaluate

from calibration_fixtures import planted_helpful_model, planted_items, word_tokenizer


def test_report_pairs_every_config_with_the_first(tmp_path):
    model, tok, items = planted_helpful_model(), word_tokenizer(), planted_items(8)
    configs = {
        "unpatched": None,
        "act": {"method": "act", "heads": {1: [2]}},
        "other head": {"method": "act", "heads": {0: [0]}},
    }
    report = evaluate(model, tok, {"planted": items}, configs=configs, batch_size=4, progress=False)
    rows = report.results["planted"]
    assert rows["unpatched"]["n"] == 8 and "paired" not in rows["unpatched"]
    assert rows["other head"]["paired"]["diff"] == 0.0 and rows["other head"]["paired"]["p_mcnemar"] == 1.0
    assert rows["act"]["accuracy"] >= rows["unpatched"]["accuracy"]
    json_path, md_path = report.save(str(tmp_path / "r"))
    assert json.load(open(json_path))["average"]["act"] == pytest.approx(report.average("act"))
    table = open(md_path).read()
    assert table.startswith("| task | n | unpatched | act | other head |") and "| planted | 8 |" in table


def test_cli_helpers():
    assert _options(["beta=0.5", 'heads={"2": [1]}', "name=x"]) == {"beta": 0.5, "heads": {"2": [1]}, "name": "x"}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        _options(["beta"])
    assert _candidates("3-5") == {3: "all", 4: "all", 5: "all"} and _candidates("all") == "all"
    args = _parser().parse_args(["calibrate", "--tasks", "sst2,copa", "--screen-layers", "2", "--limit", "4"])
    assert args.screen_layers == 2 and args.tasks == "sst2,copa" and args.limit == 4
    args = _parser().parse_args(["eval", "--profile", "p1", "--profile", "p2", "--option", "beta=0.3"])
    assert args.profile == ["p1", "p2"] and args.option == ["beta=0.3"]
