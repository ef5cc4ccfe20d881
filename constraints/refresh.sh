#!/usr/bin/env bash
# Rewrite constraints/ci.txt from .venv (pip freeze, without the editable hf-hdp; torch's local build label dropped,
# so torch==X matches the CPU and CUDA builds alike). Run after the test suite passed with the versions in .venv,
# typically: HDP_UNPINNED=1 bash scripts/setup_env.sh && bash scripts/test.sh && bash constraints/refresh.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=constraints/ci.txt
header=$(grep '^#' "$out" || true)
pins=$(.venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
  | grep -viE '^(hf-hdp|hf_hdp)[=@ ]' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f)
printf '%s\n%s\n' "$header" "$pins" > "$out"
echo "wrote $(grep -vc '^#' "$out") pins to $out (transformers $(grep -i '^transformers==' "$out" | cut -d= -f3))"
