#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run `attnpatch demo` (extra arguments go to it, e.g. --limit 50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
attnpatch demo "$@"
