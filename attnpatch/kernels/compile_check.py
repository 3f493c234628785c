"""Compile every Triton kernel specialisation the dispatcher can launch for GPU targets, without a GPU, and report
each one's resources: registers, spills, shared and local memory, and the occupancy they allow.

    attnpatch compile-check --arch sm_80,sm_90 [--full] [--json PATH]

The specialisations come from `_triton.launches.dispatcher_launches` (the launchers run on meta tensors), and each
is compiled with the JIT's own argument binding for the target (`triton.compile` on an `ASTSource`), as a launch on
that GPU would compile it. Registers, spills and stack come from ptxas's verbose log, local memory from
`cuobjdump --dump-resource-usage`, shared memory from the compiled metadata. A compile failure, a spill or shared
memory over the per-block limit fails the check (exit status 1); an occupancy under `LOW_OCCUPANCY_WARPS` warps per
SM is reported as low.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of a compute capability (CUDA programming guide, table of technical specifications)."""

    capability: int
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    register_granularity: int = 256  # registers are allocated per warp in units of 256
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 0  # the largest shared-memory carveout, bytes
    shared_per_block: int = 0  # the opt-in maximum per block, bytes
    reserved_shared_per_block: int = 1024  # the driver's share of each block's shared memory


ARCHS = {
    "sm_80": ArchLimits(80, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
    "sm_90": ArchLimits(90, shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
}
LOW_OCCUPANCY_WARPS = 8  # fewer resident warps per SM than this leaves little to hide memory latency with


def occupancy(registers: int, shared: int, warps: int, limits: ArchLimits) -> dict:
    """Blocks and warps per SM that the registers, shared memory and warps of one block allow, and the limiter."""
    regs_per_warp = -(-max(registers, 1) * 32 // limits.register_granularity) * limits.register_granularity
    by = {
        "registers": (limits.registers_per_sm // regs_per_warp) // warps,
        "shared": limits.shared_per_sm // (shared + limits.reserved_shared_per_block),
        "warps": limits.max_warps_per_sm // warps,
        "blocks": limits.max_blocks_per_sm,
    }
    blocks = min(by.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": round(blocks * warps / limits.max_warps_per_sm, 4),
        "limited_by": min(by, key=by.get),
    }


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_PTXAS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
    r"|Used (?P<regs>\d+) registers"
)


def ptxas_resources(log: str) -> dict:
    """registers, spill bytes (stores + loads) and stack bytes from ptxas -v's log (the last function in it)."""
    found: dict = {}
    for m in _PTXAS.finditer(log):
        if m["regs"]:
            found["registers"] = int(m["regs"])
        else:
            found["spills"] = int(m["stores"]) + int(m["loads"])
            found["stack"] = int(m["stack"])
    return found


def cubin_resources(cubin: bytes) -> dict:
    """REG, STACK and LOCAL of the cubin's kernel (cuobjdump --dump-resource-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text.split("Function", 1)[-1]))
    return {k.lower(): int(v) for k, v in usage.items()}


def bind(launch, arch: str):
    """(signature, constexprs, attrs, options) that Triton's JIT derives from this launch's arguments for `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", ARCHS[arch].capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _fresh_cache(path: str) -> None:
    """Compile into an empty cache, so every entry runs ptxas (its log gives the spills) and is timed whole."""
    os.environ["TRITON_CACHE_DIR"] = path


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _compile(job: tuple) -> dict:
    """Compile one bound launch for one arch in this process; the entry's resources or its error."""
    module, qualname, arch, signature, constexprs, attrs, options = job
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), qualname)
    limits = ARCHS[arch]
    entry: dict = {"ok": False}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=GPUTarget("cuda", limits.capability, 32),
                options=options,
            )
    except Exception as error:  # noqa: BLE001 - every compile failure is a finding to report
        entry["error"] = f"{type(error).__name__}: {str(error).strip()[-2000:]}"
        entry["compile_seconds"] = round(time.perf_counter() - start, 2)
        return entry
    entry["compile_seconds"] = round(time.perf_counter() - start, 2)
    ptxas = ptxas_resources(log.getvalue())
    cubin = cubin_resources(compiled.asm["cubin"])
    registers = ptxas.get("registers", cubin.get("reg", 0))
    shared = int(compiled.metadata.shared)
    warps = int(compiled.metadata.num_warps)
    entry.update(
        ok=True,
        registers=registers,
        spills=ptxas.get("spills", 0),
        stack=ptxas.get("stack", cubin.get("stack", 0)),
        local=cubin.get("local", 0),
        shared=shared,
        num_warps=warps,
        num_stages=int(compiled.metadata.num_stages),
        **occupancy(registers, shared, warps, limits),
    )
    return entry


def problems(entry: dict) -> list[str]:
    """Why an entry fails the check: a compile error, a spill, local memory, or shared memory over the block limit."""
    if not entry["ok"]:
        return ["compile error"]
    found = []
    if entry["spills"] or entry["local"]:
        found.append(f"spills {entry['spills']} B, local memory {entry['local']} B")
    limit = ARCHS[entry["arch"]].shared_per_block
    if entry["shared"] > limit:
        found.append(f"shared {entry['shared']} B over the {limit} B per-block limit of {entry['arch']}")
    return found


def check(
    archs: list[str], *, full: bool = False, only: str | None = None, jobs: int | None = None, progress=None
) -> dict:
    """Compile `dispatcher_launches(full)` for each arch (`only`: those whose kernel name or a case contains it); the
    report {"triton", "set", "archs", "entries", ...}."""
    import triton

    from ._triton.launches import dispatcher_launches
    from .backend import interpreting

    if interpreting():
        raise RuntimeError("compile-check compiles for GPUs: unset TRITON_INTERPRET (the kernels are interpreted)")
    start = time.perf_counter()
    launches = [
        launch
        for launch in dispatcher_launches(full)
        if only is None or any(only in text for text in (launch.name, *launch.cases))
    ]
    work, meta = [], []
    for arch in archs:
        for launch in launches:
            fn = launch.kernel.fn
            signature, constexprs, attrs, options = bind(launch, arch)
            work.append((fn.__module__, fn.__qualname__, arch, signature, constexprs, attrs, options))
            meta.append((launch, arch))
    jobs = jobs or min(2, os.cpu_count() or 1)
    entries = []
    with tempfile.TemporaryDirectory(prefix="attnpatch-compile-check-") as cache, contextlib.ExitStack() as stack:
        if jobs == 1:
            saved = os.environ.get("TRITON_CACHE_DIR")
            stack.callback(_restore_env, "TRITON_CACHE_DIR", saved)
            _fresh_cache(cache)
            results = map(_compile, work)
        else:  # spawned (a script that calls this needs the `if __name__ == "__main__":` guard)
            context = get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(jobs, context, _fresh_cache, (cache,)))
            results = pool.map(_compile, work)
        for i, ((launch, arch), result) in enumerate(zip(meta, results, strict=True)):
            entry = {"kernel": launch.name, "arch": arch, **result}
            entry["constexprs"] = {k: v for k, v in launch.constexprs.items()}
            entry["launch_options"] = launch.options
            entry["cases"] = launch.cases
            entry["problems"] = problems(entry)
            entry["low_occupancy"] = bool(entry["ok"]) and entry["warps_per_sm"] < LOW_OCCUPANCY_WARPS
            entries.append(entry)
            if progress:
                progress(i + 1, len(work), entry)
    return {
        "triton": triton.__version__,
        "set": "full" if full else "ci",
        "archs": {a: vars(ARCHS[a]) for a in archs},
        "low_occupancy_warps": LOW_OCCUPANCY_WARPS,
        "seconds": round(time.perf_counter() - start, 1),
        "failures": sum(bool(e["problems"]) for e in entries),
        "entries": entries,
    }


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compile-check",
        help="compile every Triton kernel specialisation for GPU targets (no GPU needed) and report resources",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--arch", default="sm_80,sm_90", help=f"comma-separated targets: {', '.join(ARCHS)}")
    p.add_argument("--full", action="store_true", help="every case (default: the CI subset)")
    p.add_argument("--only", default=None, help="only the entries whose kernel name or a case contains this text")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: min(2, CPUs))")


def run_command(args: argparse.Namespace) -> int:
    """The CLI: compile, print one line per failure and a summary; exit 1 when anything fails."""
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        print(f"attnpatch: unknown --arch {','.join(unknown)} (known: {', '.join(ARCHS)})", file=sys.stderr)
        return 2
    report = check(archs, full=args.full, only=args.only, jobs=args.jobs, progress=_progress)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    return 1 if report["failures"] else 0


def _progress(done: int, total: int, entry: dict) -> None:
    if entry["problems"]:
        print(f"FAIL {entry['kernel']} {entry['arch']} {entry['constexprs']}: {'; '.join(entry['problems'])}")
        if not entry["ok"]:
            print("  " + entry["error"].splitlines()[0])
    if done % 50 == 0 or done == total:
        print(f"[{done}/{total}]", file=sys.stderr, flush=True)


def summary(report: dict) -> str:
    """Per kernel and arch: entries, failures, and the ranges of registers, shared memory and warps per SM."""
    lines = [f"triton {report['triton']}, {report['set']} set, {len(report['entries'])} entries, {report['seconds']} s"]
    groups: dict = {}
    for e in report["entries"]:
        groups.setdefault((e["kernel"].rsplit(".", 1)[-1], e["arch"]), []).append(e)
    for (kernel, arch), es in sorted(groups.items()):
        ok = [e for e in es if e["ok"]]
        bad = sum(bool(e["problems"]) for e in es)
        low = sum(e["low_occupancy"] for e in es)
        if ok:
            regs = (min(e["registers"] for e in ok), max(e["registers"] for e in ok))
            shared = (min(e["shared"] for e in ok) // 1024, max(e["shared"] for e in ok) // 1024)
            warps = (min(e["warps_per_sm"] for e in ok), max(e["warps_per_sm"] for e in ok))
            text = f"regs {regs[0]}-{regs[1]}, shared {shared[0]}-{shared[1]} KiB, warps/SM {warps[0]}-{warps[1]}"
        else:
            text = "none compiled"
        lines.append(f"  {kernel:20s} {arch}: {len(es):4d} entries, {bad} failing, {low} low occupancy; {text}")
    lines.append("OK" if not report["failures"] else f"FAILED: {report['failures']} entries")
    return "\n".join(lines)
