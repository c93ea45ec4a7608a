#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with torch, the package (editable, dev extras) and, in .tf517, an
# overlay holding transformers 5.17 (the oldest supported version) for the remote-code smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  # A local CUDA build on the CI/dev machines; elsewhere any torch>=2.6 with its torchvision works.
  python -m pip install -q torch==2.14.1 torchvision==0.29.1 || python -m pip install -q "torch>=2.6" torchvision
fi
python -m pip install -q -e ".[dev]"
# lmms-eval next to us (the `internvl-chat lmms-eval` adapter tests; they skip where it does not install).
python -m pip install -q -e ".[lmms]" || echo "lmms-eval install failed: the lmms-eval adapter tests will skip"
# Headless Chromium for the web-UI test (Debian package; skipped where apt is not available, we are not root, or
# SKIP_CHROMIUM=1; without it the web-UI browser test skips).
if [ "${SKIP_CHROMIUM:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
    || echo "chromium install failed: the web UI test will skip"
fi
if [ ! -d .tf517/transformers ]; then
  python -m pip install -q --no-deps --target .tf517 "transformers==5.17.0" "huggingface_hub>=1.5,<2"
fi
