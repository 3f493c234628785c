"""`attnpatch info`: versions, device, and which compute paths are usable here (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from . import __version__
from .api import available_methods


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backends() -> list[tuple[str, bool, str]]:
    """(path, usable, why) for each compute path."""
    rows = [("torch (chunked PyTorch path)", True, "always available; used for every non-CUDA tensor")]
    if importlib.util.find_spec("triton") is None:
        rows.append(("triton", False, "triton is not installed"))
    elif not torch.cuda.is_available():
        rows.append(("triton", False, "no CUDA device (CPU tests can run kernels with TRITON_INTERPRET=1)"))
    else:
        rows.append(("triton", False, "Triton kernels are not part of this release yet; the torch path runs on CUDA"))
    return rows


def report() -> str:
    lines = [
        f"attnpatch {__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__}, transformers {_version('transformers')}, triton {_version('triton')}, "
        f"accelerate {_version('accelerate')}, safetensors {_version('safetensors')}",
        f"threads: {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        lines.append(
            f"device: cuda ({torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)})"
        )
    else:
        lines.append("device: cpu (no CUDA device visible)")
    lines.append("compute paths:")
    for name, usable, why in backends():
        lines.append(f"  {'yes' if usable else 'no ':3} {name}: {why}")
    lines.append(f"methods: {', '.join(available_methods())}")
    try:
        from .models import MODELS, is_installed

        lines.append("offline models:")
        for name, spec in MODELS.items():
            state = "installed" if is_installed(name) else f"missing ({spec.pip})"
            lines.append(f"  {name}: {state}")
    except ImportError:  # pragma: no cover
        pass
    return "\n".join(lines)
