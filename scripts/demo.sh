#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the built-in demo: a tiny LLaVA trained (stage 1, then stage 2) on CPU on
# real handwritten digits and rendered letters, scored on held-out images next to chance, then reloaded with
# trust_remote_code in a fresh process and asked about a held-out image through pipeline("image-text-to-text").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 internvl-chat demo "$@"
