"""The README's quick-start blocks, executed as written on the zoo's Gemma-3 270M (only the item limits made small):
the A/B's "unpatched" baseline is the unpatched model although the block applies a profile to the model first, and
the model's own patch is back after the run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attnpatch

README = Path(__file__).resolve().parents[2] / "README.md"


def block(section: str) -> str:
    text = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_quick_start_blocks_run_as_written(tmp_path, monkeypatch):
    from attnpatch.models import is_installed

    if not is_installed("gemma-3-270m"):
        pytest.skip("the zoo's gemma-3-270m package is not installed")
    monkeypatch.chdir(tmp_path)
    quick = block("Quick start")
    workflow = block("Calibration, evaluation and sink analysis")
    assert "limit=32" in workflow and 'evaluate(model, tok, ["sst2", "copa"],' in workflow
    workflow = workflow.replace("limit=32", "limit=3").replace(
        'evaluate(model, tok, ["sst2", "copa"],', 'evaluate(model, tok, ["sst2", "copa"], limit=12,'
    )
    namespace: dict = {}
    exec(compile(quick, "README.md: Quick start", "exec", dont_inherit=True), namespace)
    exec(
        compile(workflow, "README.md: Calibration, evaluation and sink analysis", "exec", dont_inherit=True), namespace
    )
    model, tok, report = namespace["model"], namespace["tok"], namespace["report"]
    patch = attnpatch.get_patch(model)
    assert patch is not None and patch.method.name == "act", "the block's own patch is back after evaluate()"
    assert (tmp_path / "sinks.png").stat().st_size > 0
    from attnpatch.eval.runner import evaluate

    patch.remove()
    clean = evaluate(model, tok, ["sst2", "copa"], limit=12, configs={"unpatched": None})
    for task in ("sst2", "copa"):
        assert report.results[task]["unpatched"] == clean.results[task]["unpatched"]
    with torch.no_grad():
        assert attnpatch.get_patch(model) is None
