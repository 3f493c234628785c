"""What users run from the repository root works there: a notebook or `python -c` imports transformers (which imports
Hugging Face's `kernels` package: nothing in the checkout may shadow it), `python -m attnpatch info`, and an
`accelerate launch` of a small patched-model script. Each runs in a fresh interpreter with the checkout as its working
directory, so the checkout's folders are first on its path, as they are for a user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import accelerate_launcher

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "helpers"


def run_in_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # only what a user has: the working directory first on the path
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed in {ROOT}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_python_c_imports_transformers():
    code = (
        "import importlib.util, os\n"
        "from transformers import LlamaConfig\n"
        "import attnpatch, attnpatch.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
        "print(attnpatch.kernels.__file__)"
    )
    kernels_origin, ours = run_in_root(sys.executable, "-c", code).stdout.split()
    if kernels_origin != "None":  # Hugging Face's package, from site-packages, never a folder of the checkout
        assert "site-packages" in Path(kernels_origin).parts or "dist-packages" in Path(kernels_origin).parts
    assert Path(ours).resolve() == ROOT / "attnpatch" / "kernels" / "__init__.py"


def test_nothing_in_the_checkout_is_importable_as_kernels():
    """No folder a user's or a script's path may start in (the root, scripts/, benchmarks/, the test helpers) holds a
    `kernels` package or module. (tests/kernels/ holds the compute layer's tests; tests/ is on no path.)"""
    for folder in (ROOT, ROOT / "scripts", ROOT / "benchmarks", HELPERS):
        assert not (folder / "kernels").exists() and not (folder / "kernels.py").exists(), folder


def test_python_m_attnpatch_info():
    out = run_in_root(sys.executable, "-m", "attnpatch", "info").stdout
    assert "attnpatch" in out and "compute paths:" in out and "methods: act" in out


@pytest.mark.slow
def test_accelerate_launch_of_a_patched_script(tmp_path):
    launcher = accelerate_launcher()
    script = tmp_path / "patched.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HELPERS)!r})\n"
        "import torch, attnpatch\n"
        "from transformers import LlamaConfig\n"
        "from tiny_models import tiny_model\n"
        "model = tiny_model('llama')\n"
        "ids = torch.tensor([[1, 5, 9, 13, 17, 21]])\n"
        "with torch.no_grad():\n"
        "    base = model(ids).logits\n"
        "    with attnpatch.patched(model, 'act', heads='all', beta=1.0):\n"
        "        same = model(ids).logits\n"
        "assert torch.allclose(base, same, atol=1e-5), 'neutral ACT changed the logits'\n"
        "print('patched-ok')\n"
    )
    cmd = [launcher, "launch", "--num_processes", "1", "--num_machines", "1", "--cpu", "--mixed_precision", "no"]
    out = run_in_root(*cmd, "--dynamo_backend", "no", str(script)).stdout
    assert "patched-ok" in out
