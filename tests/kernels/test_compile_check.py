"""`attnpatch compile-check`: the list of kernel specialisations covers what the dispatcher launches, the resource
rules flag what they should, and (CI) the subset compiles for sm_90 without compile errors, spills or oversize shared
memory. Compiling needs no GPU but must run outside Triton's interpreter: it runs in a subprocess."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnpatch.kernels import backend
from attnpatch.kernels.compile_check import ARCHS, occupancy, problems

pytestmark = pytest.mark.skipif(backend.triton_version() is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[2]
TILE_NAMES = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "EVEN_D", "UPCAST", "PRECISION", "KK_PAD", "COVER"}


@pytest.fixture(scope="module")
def full_list():
    from attnpatch.kernels._triton.launches import dispatcher_launches

    return dispatcher_launches(full=True)


def switches(launch) -> tuple:
    """A launch's kernel and the constexprs that are switches (not tiles, not interpreter-forced upcasts)."""
    return launch.name, tuple(sorted((k, v) for k, v in launch.constexprs.items() if k not in TILE_NAMES))


def uncovered(recorded, listed) -> list[str]:
    known = {switches(launch) for launch in listed}
    return sorted({f"{name} {dict(sw)}" for name, sw in map(switches, recorded) if (name, sw) not in known})


def _run_ops(device: str) -> None:
    """The public ops on small inputs, each switch a caller can set: causal/window/softcap, the LSE, ACT prefill and
    decode (sinks planted, so the correction runs), VAR under both rules, outlook forward and backward."""
    from attnpatch.kernels.act import act_attention
    from attnpatch.kernels.attention import attention
    from attnpatch.kernels.outlook import outlook_attention
    from attnpatch.kernels.var import var_attention

    from kernel_inputs import planted

    for dtype, softcap, lq in itertools.product((torch.float32, torch.float16), (None, 5.0), (9, 1)):
        q, k, v = (t.to(device) for t in planted(1, 4, 2, lq, 24, 32, dtype=dtype))
        for lse in (False, True):
            attention(q, k, v, causal=True, softcap=softcap, return_lse=lse)
        act_attention(q, k, v, scale=0.2, beta=0.4, threshold=0.0, causal=True, softcap=softcap)
        sinks = torch.zeros(1, 24, dtype=torch.bool, device=device)
        sinks[:, 0] = True
        image = torch.zeros_like(sinks)
        image[:, 2:12] = True
        for convention in ("paper", "code"):
            var_attention(q, k, v, scale=0.2, sinks=sinks, image=image, convention=convention, softcap=softcap)
    v = torch.randn(1, 6, 6, 8, device=device, requires_grad=True)
    logits = torch.randn(1, 3, 3, 81, device=device, requires_grad=True)
    outlook_attention(logits, v, 3, 1, 2).sum().backward()
    with torch.no_grad():
        outlook_attention(logits, v, 3, 1, 2)


def test_every_launch_of_the_ops_is_in_the_list(monkeypatch, full_list):
    """Launches intercepted while the ops run (Triton's interpreter here) are all in the compile list."""
    from attnpatch.kernels._triton.launches import recording

    if not torch.cuda.is_available() and not backend.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with recording(run=True) as seen:
        _run_ops("cuda" if torch.cuda.is_available() else "cpu")
    assert {launch.name.rsplit(".", 1)[-1] for launch in seen} == {
        "_flash_fwd", "_column_mass", "_sink_correction", "_var_fwd", "_outlook_fwd", "_outlook_bwd_logits",
        "_outlook_bwd_v",
    }  # fmt: skip
    assert uncovered(seen, full_list) == []
    # ... and the comparison can fail: a switch value the list lacks is reported
    planted_launch = seen[0]
    planted_launch.kwargs = {**planted_launch.kwargs, "HAS_SOFTCAP": "planted"}
    assert uncovered([planted_launch], full_list) != []


def _meta_launches(kernel: str, dtype: torch.dtype, d: int, lq: int):
    """The launches one launcher makes for q [1, 8, lq, d] against 256 keys, on meta tensors with the GPU's rules."""
    from attnpatch.kernels._triton import launches as ls

    r = ls.Rows("probe", 1, 8, 2, lq, 256)
    with ls.compiled_rules(), ls.recording() as sink:
        for name, thunk in ls._attention_calls(dtype, d, r, every_switch=False):
            if name.startswith(kernel):
                thunk()
    return sink


@pytest.mark.parametrize("dtype", backend.SUPPORTED_DTYPES, ids=str)
def test_every_tile_configuration_of_the_rule_is_in_the_list(dtype, full_list):
    """Sweep head dims and row counts across the tile rule's boundaries: each (kernel, dtype, tiles, warps, stages)
    that a launch takes is compiled by the full set."""

    def tile_key(launch):
        tiles = tuple(launch.constexprs.get(n) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
        return launch.name, str(launch.args[0].dtype), tiles, tuple(sorted(launch.options.items()))

    def masked_dims(launch):  # a head dim under BLOCK_D: masked loads (EVEN_D False), listed once per kernel
        return launch.name, launch.constexprs.get("EVEN_D")

    listed = {f(launch) for launch in full_list for f in (tile_key, masked_dims)}
    missing = set()
    kernels = ("attention", "act.flash", "var", "column_mass", "act.sink_correction")
    dims = (1, 16, 17, 32, 33, 64, 65, 80, 100, 128, 129, 200, 256)
    for kernel, d, lq in itertools.product(kernels, dims, (1, 16, 17, 4096)):
        for launch in _meta_launches(kernel, dtype, d, lq):
            missing |= {tile_key(launch), masked_dims(launch)} - listed
    assert missing == set()


def test_keyword_constexprs_are_the_kernels_constexpr_parameters(full_list):
    for launch in full_list:
        params = inspect.signature(launch.kernel.fn).parameters.values()
        assert set(launch.constexprs) == {p.name for p in params if "constexpr" in str(p.annotation)}, launch.name
        assert len(launch.args) + len(launch.constexprs) == len(params), launch.name


def test_occupancy_from_registers_shared_memory_and_warps():
    sm90, sm80 = ARCHS["sm_90"], ARCHS["sm_80"]
    # 255 registers x 256 threads: one block of 8 warps fits the register file
    assert occupancy(255, 128 * 1024, 8, sm90) == dict(
        blocks_per_sm=1, warps_per_sm=8, occupancy=0.125, limited_by="registers"
    )
    # 64 registers, 4 warps, 48 KiB: shared memory allows 4 blocks on sm_90 (228 KiB), 3 on sm_80 (164 KiB)
    assert occupancy(64, 48 * 1024, 4, sm90)["blocks_per_sm"] == 4
    assert occupancy(64, 48 * 1024, 4, sm80)["blocks_per_sm"] == 3
    assert occupancy(16, 0, 4, sm90) == dict(blocks_per_sm=16, warps_per_sm=64, occupancy=1.0, limited_by="warps")


def test_problems_flag_errors_spills_and_oversize_shared_memory():
    good = dict(ok=True, arch="sm_80", spills=0, local=0, shared=163 * 1024)
    assert problems(good) == []
    assert problems({**good, "shared": 163 * 1024 + 1}) != []
    assert problems({**good, "arch": "sm_90", "shared": 200 * 1024}) == []
    assert problems({**good, "spills": 8}) != []
    assert problems(dict(ok=False, arch="sm_90", error="x")) == ["compile error"]


def _compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", backend.ENV_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


PLANTED = """
import json, sys
from attnpatch.kernels import Tiles, kernel_options
from attnpatch.kernels.compile_check import check
with kernel_options(tiles={"flash": Tiles(16, 128, 0, 4, 6)}):
    report = check(["sm_80"], only="attention lse=False splits=1 | bfloat16 d=128 prefill", jobs=1)
json.dump(report, sys.stdout)
"""


def test_a_planted_oversize_tile_is_flagged():
    """128-key tiles at head dim 128 with 6 stages pipeline about 330 KiB of K and V: over sm_80's 163 KiB."""
    done = subprocess.run(
        [sys.executable, "-c", PLANTED], env=_compile_env(), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (entry,) = json.loads(done.stdout)["entries"]
    assert entry["constexprs"]["BLOCK_N"] == 128 and entry["num_stages"] == 6
    assert entry["ok"] and entry["shared"] > ARCHS["sm_80"].shared_per_block
    assert problems(entry) == [f"shared {entry['shared']} B over the {163 * 1024} B per-block limit of sm_80"]


def test_ci_subset_compiles_for_sm_90(tmp_path):
    """The CI check: every kernel of the CI subset compiles for sm_90 without spills or oversize shared memory."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "attnpatch", "compile-check", "--arch", "sm_90", "--json", str(out)],
        env=_compile_env(), cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["failures"] == 0 and all(e["ok"] for e in report["entries"])
    kernels = {e["kernel"].rsplit(".", 1)[-1] for e in report["entries"]}
    assert kernels == {
        "_flash_fwd", "_column_mass", "_sink_correction", "_var_fwd", "_var_merge", "_outlook_fwd",
        "_outlook_bwd_logits", "_outlook_bwd_v",
    }  # fmt: skip
