"""The `attnpatch` command: info, demo, eval, calibrate, analyze, compile-check.

A user error (an unknown task, model, method, option or dtype, a limit below 1, a missing profile) is one line on
stderr that says what to do, with exit status 2, found before any model is loaded."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .arguments import Parser, UsageError, dtype_name, positive_int

DEFAULT_TASKS = "sst2,boolq,piqa,arc_easy,arc_challenge,openbookqa,copa,hellaswag"
DEFAULT_MODEL = "gemma-3-270m"
DEMO_TASKS = ("sst2", "arc_easy", "arc_challenge", "piqa", "boolq")
LM_EVAL_TASKS = ",".join(f"attnpatch_{t}" for t in DEFAULT_TASKS.split(","))


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="attnpatch", description="Training-free attention patching toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which compute paths are usable")
    demo = sub.add_parser(
        "demo",
        help="hidden sinks in Gemma-3 270M, ACT, and an A/B on a real task",
        description=f"Hidden sinks, ACT and an A/B on a real task, on the zoo's {DEFAULT_MODEL} (Gemma-3 270M).",
    )
    demo.add_argument("--task", default="sst2", help=f"{', '.join(DEMO_TASKS)} (default: sst2)")
    demo.add_argument("--limit", type=positive_int, default=200, help="number of evaluated items (default: 200)")
    demo.add_argument(
        "--shots", type=int, default=None, help="in-context examples per item (default: 4 for sst2, else 0)"
    )
    demo.add_argument("--batch-size", type=positive_int, default=16, help="scored options per forward (default: 16)")
    demo.add_argument("--beta", type=float, default=0.4)
    demo.add_argument("--threshold", type=float, default=0.1)
    demo.add_argument("--out", default="attnpatch-out", help="output directory (default: ./attnpatch-out)")
    demo.add_argument("--cache-dir", default=None, help="model cache (default: $ATTNPATCH_CACHE or ~/.cache/attnpatch)")
    _model_args(ev := sub.add_parser("eval", help="A/B accuracy of unpatched vs patched configurations on tasks"))
    ev.add_argument("--method", default="act", help="method of the patched configurations (default: act)")
    ev.add_argument("--profile", action="append", default=[], help="a calibration profile directory (repeatable)")
    ev.add_argument("--option", action="append", default=[], help="method option KEY=VALUE (JSON value; repeatable)")
    ev.add_argument("--no-default", action="store_true", help="skip the method with default heads (profiles only)")
    ev.add_argument("--part", default="eval", help="eval (default), calibration or all")
    ev.add_argument(
        "--metric",
        default="both",
        choices=["acc", "acc_norm", "both"],
        help="acc: summed log-likelihood; acc_norm: divided by the option's length in characters without its leading "
        "space (lm-eval's definitions); both (default): a table each",
    )
    ev.add_argument(
        "--harness",
        default="attnpatch",
        choices=["attnpatch", "lm-eval"],
        help="attnpatch (default): our scorer on --tasks; lm-eval: lm-evaluation-harness's simple_evaluate on the "
        f"patched model, --tasks being lm-eval task names (default: the bundled offline ones, {LM_EVAL_TASKS})",
    )
    ev.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="--harness lm-eval: a folder of your own lm-eval task YAMLs (repeatable)",
    )
    ev.add_argument("--out", default="attnpatch-out/eval", help="output prefix: writes PREFIX.json and PREFIX.md")
    ev.add_argument(
        "--checkpoint",
        default=None,
        help="attnpatch harness: a folder (one per model) where each task and configuration's scores are saved as "
        "they finish (an unfinished one's batches every minute); a rerun with the same folder and batch size resumes",
    )
    _ocw_args(ev)
    cal = sub.add_parser(
        "calibrate", help="ACT: select the heads where it helps; VAR: find the sink dimensions; writes a profile"
    )
    _model_args(cal)
    cal.add_argument("--method", default="act", choices=["act", "var"])
    cal.add_argument("--tau", type=float, default=20.0, help="VAR: sink threshold on |x[d]| / RMS(x)")
    cal.add_argument("--candidates", default=None, help='"all", or layers like "2-15" (default: layers 2..L-2)')
    cal.add_argument("--beta", type=float, default=0.4)
    cal.add_argument("--threshold", type=float, default=0.1)
    cal.add_argument("--min-visible-rows", type=int, default=1)
    cal.add_argument("--min-z", type=float, default=1.0, help="gain must exceed this many standard errors")
    cal.add_argument("--max-heads", type=int, default=None)
    cal.add_argument(
        "--screen-layers", type=int, default=None, help="score whole layers first, then heads of the N best"
    )
    cal.add_argument("--checkpoint", default=None, help="JSONL of finished candidates; a rerun resumes from it")
    cal.add_argument("--out", default="attnpatch-out/profile", help="profile directory to write")
    from .analysis.command import add_parser as add_analyze

    add_analyze(sub)
    from .kernels.compile_check import add_parser as add_compile_check

    add_compile_check(sub)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"offline zoo model (default: {DEFAULT_MODEL}; `attnpatch info` lists them) or a local model directory",
    )
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated task names (default: {DEFAULT_TASKS})")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--limit", type=positive_int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--dtype", type=dtype_name, default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device-map", default=None, help='e.g. "auto" to spread the model over the visible devices')
    p.add_argument("--cache-dir", default=None)


def _ocw_args(ev: argparse.ArgumentParser) -> None:
    ocw = ev.add_argument_group("Only Connect Wall (--task ocw)")
    ocw.add_argument("--task", default=None, help='"ocw": the Only Connect Wall A/B instead of --tasks')
    ocw.add_argument("--mode", default="generate", choices=["generate", "constrained"])
    ocw.add_argument(
        "--data",
        default=None,
        help="OCW folder with train.json and validation.json (default: $ATTNPATCH_OCW_DIR or ../shared/data/ocw), "
        "or a JSON file of walls to evaluate",
    )
    ocw.add_argument("--split", default="validation", help="split evaluated when --data is a folder")
    ocw.add_argument("--max-new-tokens", type=int, default=144)
    ocw.add_argument("--no-connections", action="store_true", help="generate mode: task 1 (grouping) only")


def _load(args: argparse.Namespace):
    import torch

    from .models import load

    dtype = getattr(torch, args.dtype)  # a canonical name (dtype_name)
    model, tok = load(args.model, dtype=dtype, cache_dir=args.cache_dir, device_map=args.device_map)
    if args.device_map is None and torch.cuda.is_available():
        model = model.cuda()
    return model, tok


def _options(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--option needs KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _candidates(spec: str | None):
    if spec is None or spec == "all":
        return spec
    lo, _, hi = spec.partition("-")
    return {layer: "all" for layer in range(int(lo), int(hi or lo) + 1)}


def _run_eval(args: argparse.Namespace) -> int:
    from .eval.runner import evaluate
    from .profiles import Profile

    model, tok = _load(args)
    configs: dict[str, Any] = {"unpatched": None}
    if not args.no_default:
        configs[args.method] = {"method": args.method, **_options(args.option)}
    for path in args.profile:
        configs[f"{args.method} profile {os.path.basename(os.path.normpath(path))}"] = Profile.load(path)
    tasks = [t for t in _eval_tasks(args).split(",") if t]
    metrics = ["acc", "acc_norm"] if args.metric == "both" else [args.metric]
    if args.harness == "lm-eval":
        from .eval.harness import evaluate_lm_eval

        report = evaluate_lm_eval(
            model, tok, tasks, configs=configs, include_path=args.include_path, shots=args.shots, limit=args.limit,
            part=args.part, batch_size=args.batch_size, metrics=metrics, model_name=args.model,
        )  # fmt: skip
    else:
        report = evaluate(
            model, tok, tasks, configs=configs, shots=args.shots, limit=args.limit, part=args.part,
            batch_size=args.batch_size, metrics=metrics, model_name=args.model, checkpoint=args.checkpoint,
        )  # fmt: skip
    from .distributed import Processes

    if Processes().main:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        paths = report.save(args.out)
        print(report.to_markdown())
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _eval_tasks(args: argparse.Namespace) -> str:
    """--tasks, or under --harness lm-eval with the default tasks, their bundled lm-eval versions."""
    return LM_EVAL_TASKS if args.harness == "lm-eval" and args.tasks == DEFAULT_TASKS else args.tasks


def _load_any(args: argparse.Namespace):
    """A zoo model by name, or any local Hugging Face causal LM directory (model + tokenizer)."""
    if not os.path.isdir(args.model):
        return _load(args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), local_files_only=True)
    return model.eval(), tok


def _ocw_walls(args: argparse.Namespace):
    from .eval.ocw import load_walls

    if args.data and os.path.isfile(args.data):
        walls, train = load_walls(args.data), load_walls("train") if args.shots else []
    else:
        walls = load_walls(args.split, data_dir=args.data)
        train = load_walls("train", data_dir=args.data) if args.shots else []
    return walls[: args.limit], train


def _run_ocw(args: argparse.Namespace) -> int:
    from .eval.ocw.runner import evaluate_ocw
    from .profiles import Profile

    walls, train = _ocw_walls(args)
    model, tok = _load_any(args)
    configs: dict[str, Any] = {"unpatched": None}
    if not args.no_default:
        configs[args.method] = {"method": args.method, **_options(args.option)}
    for path in args.profile:
        configs[f"{args.method} profile {os.path.basename(os.path.normpath(path))}"] = Profile.load(path)
    report = evaluate_ocw(
        model, tok, walls, configs=configs, mode=args.mode, train=train, shots=args.shots,
        connections=not args.no_connections, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        model_name=args.model, split=args.split if not (args.data and os.path.isfile(args.data)) else args.data,
    )  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    paths = report.save(args.out)
    print(report.to_markdown())
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .distributed import Processes

    model, tok = _load(args)
    if args.method == "var":
        profile = calibrate(model, tok, None, method="var", tau=args.tau)
        profile.save(args.out)
        print(f"sink dims {profile.options['sink_dims']} (tau {args.tau}); profile in {args.out}")
        return 0
    profile = calibrate(
        model, tok, [t for t in args.tasks.split(",") if t], method="act", beta=args.beta, threshold=args.threshold,
        min_visible_rows=args.min_visible_rows, candidates=_candidates(args.candidates), shots=args.shots,
        limit=args.limit, min_z=args.min_z, max_heads=args.max_heads, screen_layers=args.screen_layers,
        batch_size=args.batch_size,
        checkpoint=args.checkpoint,
    )  # fmt: skip
    if Processes().main:
        profile.save(args.out)
        meta = profile.metadata
        print(
            f"selected {profile.num_heads} heads in layers {sorted(profile.heads)}; calibration score "
            f"{meta['baseline']['score']:.4f} -> {(meta['calibrated'] or meta['baseline'])['score']:.4f}, accuracy "
            f"{meta['baseline']['accuracy']:.3f} -> {(meta['calibrated'] or meta['baseline'])['accuracy']:.3f}; "
            f"{meta['seconds']['total']:.0f} s ({meta['resumed']} candidates resumed from the checkpoint, "
            f"{meta['seconds']['compute']:.0f} s with their own); profile in {args.out}"
        )
    return 0


def _check_tasks(names: list[str]) -> None:
    from .eval.tasks import available_tasks

    known = set(available_tasks(subjects=True))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UsageError(
            f"unknown task(s) {unknown or names}; tasks: {', '.join(available_tasks())} and mmlu_<subject>"
        )


def _check_model(name: str) -> None:
    from .models import available_models

    if not os.path.isdir(name) and name not in available_models():
        raise UsageError(
            f"unknown model {name!r}; zoo models: {', '.join(available_models())}, or a local model directory"
        )


def _check_method(args: argparse.Namespace) -> None:
    from .api import available_methods
    from .methods import METHODS

    if args.method not in available_methods():
        raise UsageError(f"unknown method {args.method!r}; methods: {', '.join(available_methods())}")
    options = _options(args.option)
    if options and not args.no_default:
        names = set(METHODS[args.method].config_class.__dataclass_fields__)
        unknown = sorted(set(options) - names)
        if unknown:
            raise UsageError(f"--option {unknown} is not an option of {args.method}; options: {sorted(names)}")
        try:
            METHODS[args.method].config_class(**options)
        except (TypeError, ValueError) as error:
            raise UsageError(f"--option: {error}") from None


def _check_lm_eval(args: argparse.Namespace) -> None:
    import importlib.util

    if args.task is not None:
        raise UsageError("--harness lm-eval runs multiple-choice tasks (--tasks); the OCW runs without it")
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--harness lm-eval needs lm-evaluation-harness: pip install lm-eval (or 'attnpatch[eval]')")
    missing = [path for path in args.include_path if not os.path.isdir(path)]
    if missing:
        raise UsageError(f"--include-path {missing} is not a folder; give folders of lm-eval task YAMLs")
    if not [t for t in args.tasks.split(",") if t]:
        raise UsageError("--tasks is empty; give lm-eval task names")


def _check_profiles(paths: list[str]) -> None:
    for path in paths:
        if not os.path.isfile(os.path.join(path, "attnpatch_config.json")):
            raise UsageError(
                f"--profile {path!r} is not a profile directory (no attnpatch_config.json); write one with "
                "`attnpatch calibrate --out DIR`"
            )


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments before any model or data is loaded."""
    if args.command == "demo" and args.task not in DEMO_TASKS:
        raise UsageError(f"unknown demo task {args.task!r}; the demo runs {', '.join(DEMO_TASKS)}")
    if args.command in ("eval", "calibrate"):
        _check_model(args.model)
    if args.command == "eval":
        if args.task not in (None, "ocw"):
            raise UsageError(f"--task {args.task!r}: only 'ocw' is supported (multiple-choice tasks go in --tasks)")
        if args.task is None and args.harness == "attnpatch":
            _check_tasks([t for t in args.tasks.split(",") if t])
        if args.checkpoint and (args.harness == "lm-eval" or args.task == "ocw"):
            raise UsageError("--checkpoint resumes the attnpatch harness's multiple-choice tasks only; drop it")
        if args.harness == "lm-eval":
            _check_lm_eval(args)
        elif args.data and not os.path.exists(args.data):
            raise UsageError(f"--data {args.data!r} does not exist; give an OCW folder or a JSON file of walls")
        _check_method(args)
        _check_profiles(args.profile)
    if args.command == "calibrate" and args.method == "act":
        _check_tasks([t for t in args.tasks.split(",") if t])


def main(argv: list[str] | None = None) -> int:
    from .methods.base import UnsupportedModelError
    from .profiles import ProfileError

    try:
        args = _parser().parse_args(argv)
        check_arguments(args)
        return _run(args)
    except (UsageError, ProfileError, UnsupportedModelError) as error:
        print(f"attnpatch: {error}", file=sys.stderr)
        return 2
    except ImportError as error:  # a zoo model or data package that is not installed: the message says what to run
        if "install" not in str(error):
            raise
        print(f"attnpatch: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    if args.command == "eval":
        return _run_ocw(args) if args.task == "ocw" else _run_eval(args)
    if args.command == "calibrate":
        return _run_calibrate(args)
    if args.command == "analyze":
        from .analysis.command import run_command

        return run_command(args)
    if args.command == "compile-check":
        from .kernels.compile_check import run_command as run_compile_check

        return run_compile_check(args)
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
