#!/usr/bin/env bash
# Create .venv with the CPU build of torch and hf-hdp (editable, with the dev extra), every package at the tested
# version of constraints/ci.txt. Idempotent: re-installs when .venv lacks a package or holds another version of a
# pinned one. Sourced by scripts/demo.sh and scripts/test.sh; safe to run on a fresh checkout.
# HDP_UNPINNED=1: install the newest versions pyproject.toml's ranges allow instead (to try new releases before
# refreshing the pins with constraints/refresh.sh; see README, "Tested versions").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
PINS=constraints/ci.txt
SECONDS=0
worked=0
say() { echo "setup_env: $*" >&2; }  # progress on stderr: a fresh set-up takes about a minute, pip runs quietly
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1) ..."
  "$PY" -m venv .venv
fi
pip_install() {
  worked=1
  .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
# torch is pinned here (dev/CI) to the 2.13.0 CPU build; the library itself only asks for torch>=2.5.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  say "installing torch 2.13.0 (the largest download) ..."
  pip_install torch==2.13.0
fi
if [ "${HDP_UNPINNED:-0}" = 1 ]; then
  say "HDP_UNPINNED=1: installing hf-hdp[dev] with the newest versions pyproject.toml allows ..."
  pip_install --upgrade --upgrade-strategy eager -e '.[dev]' torch==2.13.0
else
  # a pinned package at another version (an older .venv, a manual upgrade) or a missing import: install the pins
  if ! .venv/bin/python - "$PINS" <<'EOF' 2>/dev/null
import re, sys
from importlib.metadata import distributions
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, _, version = line.partition("==")
        pins[norm(name)] = version.strip()
installed = {norm(d.metadata["Name"]): d.version.split("+")[0] for d in distributions()}
drift = {n: (installed[n], v) for n, v in pins.items() if n in installed and installed[n] != v}
if drift:
    print("not at the pinned version:", drift, file=sys.stderr)
    sys.exit(1)
from importlib.util import find_spec
missing = [m for m in ("hf_hdp", "transformers", "accelerate", "datasets", "pytest", "tokenizers", "matplotlib",
                       "nbclient", "ipykernel", "peft", "tensorboard", "trl") if find_spec(m) is None]
if missing:
    print("missing:", missing, file=sys.stderr)
    sys.exit(1)
EOF
  then
    say "installing hf-hdp (editable, dev extra) and its dependencies at the pinned versions of $PINS ..."
    pip_install -c "$PINS" -e '.[dev]' torch==2.13.0
  fi
fi
[ "$(.venv/bin/ruff --version 2>/dev/null)" = "ruff $(sed -n 's/^ruff==//p' "$PINS")" ] || pip_install -c "$PINS" ruff  # scripts/lint.sh
.venv/bin/python -c "import hf_hdp, torch, transformers, accelerate, datasets, pytest" \
  || { echo "setup failed: see the pip output above" >&2; exit 1; }
[ "$worked" = 0 ] || say "done in ${SECONDS} s (.venv is ready; later runs skip this)"
