"""`attnpatch info`: versions, device, and which compute paths are usable here (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from . import __version__
from .api import available_methods
from .kernels import backend, platform_flash


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backends() -> list[tuple[str, bool, str]]:
    """(path, usable, why) for each compute path, and which one kernel ops take now."""
    flash = platform_flash.unsupported(torch.zeros(1), softcap=None)
    first_pass = "PyTorch's CPU flash kernel" if flash is None else f"blocks (no CPU flash kernel: {flash})"
    rows = [
        (
            "torch (PyTorch path)",
            True,
            f"always available; runs every non-CUDA tensor by default; first pass on CPU: {first_pass}",
        )
    ]
    cuda = torch.device("cuda")
    cannot = backend.triton_unusable(cuda)
    if cannot is None and not torch.cuda.is_available():
        cannot = "no CUDA device (the CPU tests run the kernels with TRITON_INTERPRET=1)"
    rows.append((f"triton {backend.triton_version() or ''}".strip(), cannot is None, cannot or "CUDA tensors"))
    return rows


def active_path() -> str:
    """One line: the path kernel ops take now on this machine's default device, and why."""
    try:
        path, why = backend.describe()
    except ValueError as err:  # a bad ATTNPATCH_BACKEND value
        return f"active: error ({err})"
    return f"active: {path} ({why}); {backend.ENV_VAR}={backend.requested()}"


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
    lines.append(f"  {active_path()}")
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
