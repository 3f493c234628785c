"""Calibration and evaluation under `accelerate launch` with 2 CPU processes give the single-process results."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from dp_worker import run
from launchers import accelerate_launcher

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    launcher = accelerate_launcher()
    out = tmp_path / "dp.json"
    env = {**os.environ, "PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` is accelerate's torchrun launcher; with no GPU the processes join a gloo (CPU) group.
    # (`--cpu --num_processes 2` starts a single process unless an MPI launcher is configured.)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", os.path.join(HELPERS, "dp_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(out.read_text())
    single = json.loads(json.dumps(run()))
    assert sharded["world"] == 2 and single["world"] == 1
    assert sharded["heads"] == single["heads"] == {"1": [2]}
    for a, b in zip(sharded["candidates"], single["candidates"], strict=True):
        assert a["layer"] == b["layer"] and a["head"] == b["head"]
        assert a["delta"] == pytest.approx(b["delta"], abs=1e-6)
    assert sharded["results"] == single["results"]
