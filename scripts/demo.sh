#!/usr/bin/env bash
# Set up (if needed) and run the main job: an HDP fine-tune on 4 CPU processes of a small
# Llama-architecture model on the Python standard library. Extra arguments go to examples/hdp_demo.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/torchrun --nproc_per_node "${NPROC:-4}" --master_port "${MASTER_PORT:-29517}" examples/hdp_demo.py "$@"
