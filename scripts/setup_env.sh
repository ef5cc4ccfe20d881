#!/usr/bin/env bash
# Create .venv with the CPU build of torch and hf-hdp (editable, with the dev extra). Idempotent.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run on a fresh checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch is pinned here (dev/CI) to the 2.13.0 CPU build; the library itself only asks for torch>=2.5.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
if ! .venv/bin/python -c "import hf_hdp, transformers, accelerate, datasets, pytest, tokenizers, matplotlib, nbclient, ipykernel, peft, tensorboard" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import hf_hdp, torch, transformers, accelerate, datasets, pytest" \
  || { echo "setup failed: see the pip output above" >&2; exit 1; }
