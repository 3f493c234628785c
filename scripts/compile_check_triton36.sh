#!/usr/bin/env bash
# Compile every Triton kernel specialisation for sm_80 and sm_90 under Triton 3.6 (the GPU machine's version) and
# under the environment's Triton, and write both reports to benchmarks/results/. No GPU needed.
#
#   bash scripts/compile_check_triton36.sh [--full] [other compile-check arguments]
#
# Triton 3.6 goes into its own venv ($TRITON36_VENV, default /tmp/attnpatch-triton36, outside the repository):
# the triton==3.6.0 wheel alone (--no-deps), with a .pth file that puts the main venv's site-packages (torch,
# numpy, attnpatch) after it on the path. The kernels only need triton.jit and the compiler from it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRITON36_VENV:-/tmp/attnpatch-triton36}
MAIN_PY=.venv/bin/python
[ -x "$MAIN_PY" ] || bash scripts/setup.sh
if [ ! -x "$VENV/bin/python" ]; then
    "$MAIN_PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --no-deps triton==3.6.0
    "$MAIN_PY" -c "import site; print(site.getsitepackages()[0])" \
        >"$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")/zz_attnpatch_main_venv.pth"
fi
unset TRITON_INTERPRET ATTNPATCH_BACKEND
OUT=benchmarks/results
for py in "$VENV/bin/python" "$MAIN_PY"; do
    version=$("$py" -c "import triton; print('.'.join(triton.__version__.split('.')[:2]))")
    echo "== triton $version" >&2
    # a failing check still writes its report; the exit status says whether any entry failed
    PYTHONPATH=$PWD "$py" -m attnpatch compile-check --arch sm_80,sm_90 --json "$OUT/compile_check_triton$version.json" "$@" ||
        echo "compile-check under triton $version found failures (see the report)" >&2
done
