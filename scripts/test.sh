#!/usr/bin/env bash
# Set up (if needed) and run the test suite on CPU processes: all of it, or with --fast the tests that start no ranks
# and no interpreters of their own (-m "not distributed and not slow", markers set by tests/conftest.py). Other
# arguments go to pytest. docs/testing.md describes both tiers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
args=()
for arg in "$@"; do
  if [ "$arg" = --fast ]; then args+=(-m "not distributed and not slow"); else args+=("$arg"); fi
done
exec .venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
