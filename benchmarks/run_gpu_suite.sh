#!/usr/bin/env bash
# The GPU suite in one device call: installs nothing (attnpatch runs from this tree; torch, triton, transformers,
# timm and matplotlib are the machine's own), runs the GPU tests (the Triton kernel and model tests run their CUDA paths
# there) and every GPU benchmark, and writes JSON, PNG plots, logs and a JUnit report.
#
#   bash benchmarks/run_gpu_suite.sh [--smoke] [STAGE ...]
#
# STAGE: env, tests, attention, var, outlook, generate, profile (profile_calls.py: host vs device time, launches and
# read-backs per op call), tiles (the tile sweep of tune_tiles.py); `bench` = the four benchmarks; default: all but
# profile and tiles.
# Results go to $RESULTS (default /tmp/attnpatch_gpu_suite); where $OUT is set (the device tool), they are packed into
# $OUT/gpu_suite.tar.gz and the log is copied beside it. Unpack the archive into benchmarks/results/ and commit it.
# A stage that fails or outruns its time is recorded in stages.tsv and the next one runs. Times: each stage at most
# STAGE_TIMEOUT seconds (default 540), all of them within SUITE_SECONDS (default 560, so that the results are packed
# inside the device tool's 600 s per command); a stage that would start with under 30 s left is skipped (exit status
# "skipped"). The benchmarks write their JSON after every shape, so a stage cut short keeps what it measured.
# --smoke: the benchmarks' tiny shapes, on CPU too: a check of this script, not a measurement.
# Per stage, TIMEOUT_<stage> overrides STAGE_TIMEOUT and ARGS_<stage> adds arguments to its command (for example
# ARGS_attention="--lengths 1024 4096 --repeats 20"); PYTEST_ARGS adds pytest options (for example "-n 8 --timeout 120"
# with pytest-xdist and pytest-timeout) and TESTS replaces the test paths.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-/tmp/attnpatch_gpu_suite}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
DEADLINE=$(($(date +%s) + ${SUITE_SECONDS:-560}))
SMOKE=()
STAGES=()
for arg in "$@"; do
    case "$arg" in
    --smoke) SMOKE=(--smoke) ;;
    bench) STAGES+=(attention var outlook generate) ;;
    env | tests | attention | var | outlook | generate | profile | tiles) STAGES+=("$arg") ;;
    *)
        echo "unknown argument $arg (stages: env tests attention var outlook generate profile tiles bench; --smoke)" >&2
        exit 2
        ;;
    esac
done
[ ${#STAGES[@]} -gt 0 ] || STAGES=(env tests attention var outlook generate)
mkdir -p "$RESULTS"
LOG="$RESULTS/suite.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: >"$RESULTS/stages.tsv"

# attnpatch from this tree without installing anything: the checkout's root on the path (the compute layer is
# attnpatch/kernels/, so nothing here shadows an installed package); -P keeps a script's own folder off the path
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYP=("$PY" -P)
"${PYP[@]}" -c "import attnpatch.kernels" || { echo "attnpatch does not import from $ROOT" | tee -a "$LOG"; exit 1; }

run_stage() { # name, command...: run with a time limit, log it, record its exit status and duration
    local name=$1 start rc limit
    shift
    start=$(date +%s)
    limit=$((DEADLINE - start))
    if [ "$limit" -lt 30 ]; then
        printf '%s\tskipped\t0s\n' "$name" | tee -a "$RESULTS/stages.tsv"
        return
    fi
    local own="TIMEOUT_$name"
    own=${!own:-$STAGE_TIMEOUT}
    [ "$limit" -lt "$own" ] || limit=$own
    echo "=== $name (at most ${limit}s): $*" | tee -a "$LOG"
    if declare -F "$1" >/dev/null; then "$@"; else timeout "$limit" "$@"; fi 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%ss\n' "$name" "$rc" "$(($(date +%s) - start))" | tee -a "$RESULTS/stages.tsv"
}

env_report() {
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true; } \
        >"$RESULTS/nvidia_smi.csv"
    "${PYP[@]}" - "$RESULTS/env.json" <<'EOF'
import json, platform, sys
import torch, transformers
from attnpatch.kernels import backend
import attnpatch
info = {"attnpatch_from": attnpatch.__file__, "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": backend.triton_version(), "transformers": transformers.__version__,
        "machine": platform.machine()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
for name in ("timm", "peft", "matplotlib"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF
}

# the GPU tests (kernels at real sizes: tests/kernels/test_gpu.py and test_outlook.py's gpu cases; whole models:
# tests/methods/test_gpu_models.py) and the kernel and model tests, whose Triton paths run on CUDA there (TESTS
# overrides the list)
DEFAULT_TESTS="tests/kernels tests/methods"
read -r -a GPU_TESTS <<<"${TESTS:-$DEFAULT_TESTS}"
read -r -a PYTEST_EXTRA <<<"${PYTEST_ARGS:-}"
stage_args() { # the words of ARGS_<stage>
    local own="ARGS_$1"
    read -r -a EXTRA <<<"${!own:-}"
}
for stage in "${STAGES[@]}"; do
    case "$stage" in
    env) run_stage env env_report ;;
    tests) run_stage tests "${PYP[@]}" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$RESULTS/gpu_tests.xml" \
        "${PYTEST_EXTRA[@]}" "${GPU_TESTS[@]}" ;;
    attention) stage_args attention && run_stage attention "$PY" benchmarks/bench_attention.py --out-dir "$RESULTS" "${SMOKE[@]}" "${EXTRA[@]}" ;;
    var) stage_args var && run_stage var "$PY" benchmarks/bench_var.py --out-dir "$RESULTS" "${SMOKE[@]}" "${EXTRA[@]}" ;;
    outlook) stage_args outlook && run_stage outlook "$PY" benchmarks/bench_outlook.py --out-dir "$RESULTS" "${SMOKE[@]}" "${EXTRA[@]}" ;;
    generate) stage_args generate && run_stage generate "$PY" benchmarks/bench_generate.py --out-dir "$RESULTS" "${SMOKE[@]}" "${EXTRA[@]}" ;;
    profile) stage_args profile && run_stage profile "$PY" benchmarks/profile_calls.py --out-dir "$RESULTS" "${SMOKE[@]}" "${EXTRA[@]}" ;;
    tiles) stage_args tiles && run_stage tiles "$PY" benchmarks/tune_tiles.py --out-dir "$RESULTS" "${SMOKE[@]}" "${EXTRA[@]}" ;;
    esac
done

echo "stages (name, exit status, seconds):" && cat "$RESULTS/stages.tsv"
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/gpu_suite.tar.gz" -C "$RESULTS" --exclude ./.site . && cp "$LOG" "$OUT/suite.log"
    echo "packed $(tar -tzf "$OUT/gpu_suite.tar.gz" | wc -l) entries into \$OUT/gpu_suite.tar.gz (from $ROOT)"
fi
! grep -qv $'\t0\t' "$RESULTS/stages.tsv"
