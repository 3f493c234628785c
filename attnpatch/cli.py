"""The `attnpatch` command: info, demo."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnpatch", description="Training-free attention patching toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which compute paths are usable")
    demo = sub.add_parser("demo", help="hidden sinks in Gemma-3 270M, ACT, and an A/B on a real task")
    demo.add_argument("--task", default="sst2", help="sst2, arc_easy, arc_challenge, piqa or boolq (default: sst2)")
    demo.add_argument("--limit", type=int, default=200, help="number of evaluated items (default: 200)")
    demo.add_argument(
        "--shots", type=int, default=None, help="in-context examples per item (default: 4 for sst2, else 0)"
    )
    demo.add_argument("--batch-size", type=int, default=16, help="scored options per forward (default: 16)")
    demo.add_argument("--beta", type=float, default=0.4)
    demo.add_argument("--threshold", type=float, default=0.1)
    demo.add_argument("--out", default="attnpatch-out", help="output directory (default: ./attnpatch-out)")
    demo.add_argument("--cache-dir", default=None, help="model cache (default: $ATTNPATCH_CACHE or ~/.cache/attnpatch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    from .demo import run_demo

    run_demo(
        task=args.task,
        limit=args.limit,
        shots=args.shots,
        batch_size=args.batch_size,
        out_dir=args.out,
        beta=args.beta,
        threshold=args.threshold,
        cache_dir=args.cache_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
