"""Run under `accelerate launch --num_processes 2 --cpu tests/helpers/dp_worker.py OUT.json` by
tests/integrations/test_distributed.py: calibration and evaluation of the planted model with items sharded over the
processes."""

from __future__ import annotations

import json
import sys

import attnpatch
from attnpatch.distributed import Processes
from attnpatch.eval.runner import evaluate

from calibration_fixtures import planted_helpful_model, planted_items, word_tokenizer


def run() -> dict:
    model, tok, items = planted_helpful_model(), word_tokenizer(), planted_items(9)
    profile = attnpatch.calibrate(model, tok, items, candidates={0: [1], 1: "all"}, progress=False, batch_size=2)
    configs = {"unpatched": None, "act": {"method": "act", "heads": {1: [2]}}}
    report = evaluate(model, tok, {"planted": items}, configs=configs, batch_size=2, progress=False)
    return {
        "world": Processes().world,
        "heads": {str(k): v for k, v in profile.heads.items()},
        "candidates": profile.metadata["candidates"],
        "results": report.results,
    }


if __name__ == "__main__":
    result = run()
    if Processes().main:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
