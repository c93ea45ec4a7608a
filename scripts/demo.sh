#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the built-in demo: a tiny model built, saved, reloaded with
# trust_remote_code in a fresh process, and chatting through pipeline("image-text-to-text").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 internvl-chat demo "$@"
