"""The CLI speaks in sentences: a user error is one line on stderr that says what to do, exit status 2, no traceback,
found before any model is loaded or any file written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnpatch.cli import main

CASES = [
    (["eval", "--tasks", "sst2,nope"], "unknown task(s) ['nope']"),
    (["eval", "--limit", "0"], "--limit: must be at least 1, got 0"),
    (["eval", "--limit", "-2"], "--limit: must be at least 1, got -2"),
    (["eval", "--limit", "many"], "expected a whole number"),
    (["eval", "--dtype", "fp64"], "unknown dtype 'fp64'; use float32 (fp32), float16 (fp16) or bfloat16 (bf16)"),
    (["eval", "--model", "nope"], "unknown model 'nope'; zoo models: gemma-3-270m"),
    (["eval", "--method", "nope"], "unknown method 'nope'; methods: act"),
    (["eval", "--option", "beta=2"], "--option: beta must be in [0.0, 1.0], got 2"),
    (["eval", "--option", "betta=0.3"], "--option ['betta'] is not an option of act"),
    (["eval", "--option", "beta"], "--option needs KEY=VALUE"),
    (["eval", "--profile", "no/such/dir"], "is not a profile directory"),
    (["eval", "--task", "wall"], "only 'ocw' is supported"),
    (["eval", "--task", "ocw", "--data", "no/such/walls.json"], "--data 'no/such/walls.json' does not exist"),
    (["calibrate", "--tasks", "copa,xx"], "unknown task(s) ['xx']"),
    (["demo", "--task", "nope"], "unknown demo task 'nope'"),
    (["demo", "--limit", "0"], "--limit: must be at least 1"),
    (["analyze", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["nope"], "invalid choice: 'nope'"),
]


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_user_errors_are_one_line_with_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnpatch: ") and message in err, err
    assert list(tmp_path.iterdir()) == [], "nothing may be written before the arguments are checked"


def test_the_installed_command_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "attnpatch", "eval", "--dtype", "fp16", "--limit", "0"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("dtype", ["fp16", "float16", "half", "bf16", "BFloat16", "fp32", "torch.float32"])
def test_usual_dtype_spellings_are_accepted(dtype):
    from attnpatch.arguments import dtype_name

    assert dtype_name(dtype) in ("float16", "bfloat16", "float32")


@pytest.mark.parametrize("command", ["eval", "calibrate", "demo"])
def test_help_names_the_default_model(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "gemma-3-270m" in out
