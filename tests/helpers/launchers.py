"""Finding the command-line launchers the tests run (accelerate's)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest


def accelerate_launcher() -> str:
    """The `accelerate` command of this interpreter's environment (the test skips when there is none)."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    return launcher
