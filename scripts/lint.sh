#!/usr/bin/env bash
# Lint and format check (ruff, pinned in constraints/ci.txt and installed by scripts/setup_env.sh; rules in
# pyproject.toml [tool.ruff]). Fails on any finding; `.venv/bin/ruff check --fix` and `.venv/bin/ruff format` fix
# most of them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
PATHS=(hf_hdp tests examples benchmarks scripts)
status=0
.venv/bin/ruff check "${PATHS[@]}" || status=1
.venv/bin/ruff format --check "${PATHS[@]}" || status=1
exit $status
