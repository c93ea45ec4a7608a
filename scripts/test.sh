#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the default test suite (CPU, offline) plus ruff. Extra args go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the heavier tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 INTERNVL_CHAT_COMPAT_PATH="$PWD/.tf517"
ruff check
ruff format --check
python -m pytest -q "$@"
