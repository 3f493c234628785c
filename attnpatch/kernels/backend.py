"""Which compute path runs an op: Triton kernels on CUDA tensors, the PyTorch path everywhere else.

`ATTNPATCH_BACKEND=torch|triton|auto` forces a path. Forcing `triton` on CPU tensors needs `TRITON_INTERPRET=1`
(set before attnpatch is imported): that is how the CPU test suite runs the kernels. When the automatic choice cannot
use Triton for a call (an unsupported dtype, head dim or mask), the PyTorch path takes it and a notice naming the
reason is logged once per reason; when Triton is forced, the same reason is an error instead.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

ENV_VAR = "ATTNPATCH_BACKEND"
CHOICES = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

logger = logging.getLogger("attnpatch")
_noticed: set[str] = set()


class BackendError(RuntimeError):
    """The forced backend cannot run this call."""


def requested() -> str:
    """The value of ATTNPATCH_BACKEND ('auto' when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@functools.cache
def triton_version() -> str | None:
    """The installed Triton version, or None."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def triton_unusable(device: torch.device) -> str | None:
    """Why Triton cannot run on `device`, or None when it can."""
    if triton_version() is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"the tensors are on {device.type}, and Triton runs on CUDA (or on CPU with TRITON_INTERPRET=1)"


def tensor_support(q: torch.Tensor, *others: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these q/k/v tensors, or None when they can."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    if any(t.dtype != q.dtype for t in others):
        return f"mixed dtypes {[str(t.dtype) for t in (q, *others)]}"
    if any(t.shape[-1] != q.shape[-1] for t in others):
        return f"different head dims for q/k/v {[t.shape[-1] for t in (q, *others)]}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (supported: up to {MAX_HEAD_DIM})"
    if any(t.device != q.device for t in others):
        return "tensors on different devices"
    return None


def choose(op: str, device: torch.device, unsupported: str | None = None) -> str:
    """'triton' or 'torch' for one call of `op` on `device`; `unsupported` is the op's own reason against Triton."""
    want = requested()
    if want == "torch":
        return "torch"
    cannot = triton_unusable(device)
    if want == "triton":
        if cannot is not None:
            raise BackendError(f"{ENV_VAR}=triton, but {cannot}. Unset {ENV_VAR} to use the PyTorch path.")
        if unsupported is not None:
            raise BackendError(
                f"{ENV_VAR}=triton, but the Triton {op} kernel does not support {unsupported}. "
                f"Unset {ENV_VAR} to let the PyTorch path take such calls."
            )
        return "triton"
    if device.type != "cuda":
        return "torch"
    reason = cannot or unsupported
    if reason is not None:
        _notice_once(f"attnpatch {op}: the PyTorch path runs this call because of {reason}.")
        return "torch"
    return "triton"


def _notice_once(message: str) -> None:
    if message not in _noticed:
        _noticed.add(message)
        logger.warning(message)


def describe(device: torch.device | None = None) -> tuple[str, str]:
    """(path, why) that an op on `device` (default: cuda when present, else cpu) would take now."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    want = requested()
    cannot = triton_unusable(device)
    if want == "torch":
        return "torch", f"forced by {ENV_VAR}=torch"
    if want == "triton":
        if cannot:
            return "error", f"{ENV_VAR}=triton but {cannot}"
        mode = "interpreter" if device.type == "cpu" else f"triton {triton_version()}"
        return "triton", f"forced by {ENV_VAR}=triton ({mode})"
    if device.type == "cuda" and cannot is None:
        return "triton", f"CUDA tensors use the Triton kernels (triton {triton_version()})"
    return "torch", cannot or f"{device.type} tensors use the PyTorch path"


def plan(
    op: str,
    q: torch.Tensor,
    others: tuple[torch.Tensor, ...],
    mask,
    *,
    causal: bool,
    sliding_window: int | None,
    unsupported: str | None = None,
    mask_memo: dict | None = None,
):
    """(path, KeyRanges or None) for one call: checks the tensors and turns the mask into the kernels' key ranges
    when Triton may run it, or on the PyTorch path when the call brings the forward's masking.MaskMemo (where the
    ranges are remembered for the other layers)."""
    from .masking import to_key_ranges

    want = requested()
    if want == "torch" or (want == "auto" and q.device.type != "cuda"):
        # a 4-D mask seen once per forward becomes KeyRanges, which the PyTorch path masks by its diagonal only
        if mask_memo is None or not isinstance(mask, torch.Tensor):
            return "torch", None
        b, _, lq, _ = q.shape
        ranges, _ = to_key_ranges(
            mask, b, lq, others[0].shape[2], causal=causal, sliding_window=sliding_window, device=q.device,
            memo=mask_memo,
        )  # fmt: skip
        return "torch", ranges
    reason = unsupported or tensor_support(q, *others)
    ranges = None
    if reason is None:
        b, _, lq, _ = q.shape
        ranges, reason = to_key_ranges(
            mask,
            b,
            lq,
            others[0].shape[2],
            causal=causal,
            sliding_window=sliding_window,
            device=q.device,
            memo=mask_memo,
        )
    return choose(op, q.device, reason), ranges


PROBS_UNSUPPORTED = "returning the attention probabilities (output_attentions=True)"


def plan_rows(
    op: str,
    q: torch.Tensor,
    others: tuple[torch.Tensor, ...],
    mask,
    rows: torch.Tensor | None,
    *,
    causal: bool,
    sliding_window: int | None,
    return_probs: bool = False,
    mask_memo: dict | None = None,
):
    """`plan` for an op that changes chosen query rows and returns its probabilities on the PyTorch path only:
    (path, KeyRanges or None, rows [B, Lq] bool; default: every row that sees a key)."""
    from .masking import query_rows

    path, ranges = plan(
        op, q, others, mask, causal=causal, sliding_window=sliding_window,
        unsupported=PROBS_UNSUPPORTED if return_probs else None, mask_memo=mask_memo,
    )  # fmt: skip
    b, _, lq, _ = q.shape
    return path, ranges, query_rows(rows, ranges if ranges is not None else mask, b, lq, q.device)
