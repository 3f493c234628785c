#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then lint and run the whole test suite, slow real-model tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check attnpatch tests benchmarks scripts
ruff format --check attnpatch tests benchmarks scripts
pytest -q "$@"
