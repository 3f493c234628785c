"""Command-line argument types and errors shared by the `attnpatch` subcommands."""

from __future__ import annotations

import argparse

DTYPES = {  # accepted spellings -> torch dtype name
    **dict.fromkeys(("float32", "fp32", "f32", "float"), "float32"),
    **dict.fromkeys(("float16", "fp16", "f16", "half"), "float16"),
    **dict.fromkeys(("bfloat16", "bf16"), "bfloat16"),
}


class UsageError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors raised as UsageError (one line), not printed as a usage block."""

    def error(self, message: str):  # argparse's own errors: one line, not a usage block
        raise UsageError(f"{message} (`{self.prog} --help` lists the options)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def dtype_name(text: str) -> str:
    name = DTYPES.get(text.strip().lower().removeprefix("torch."))
    if name is None:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; use float32 (fp32), float16 (fp16) or bfloat16 (bf16)"
        )
    return name
