#!/usr/bin/env bash
# Set up, then run the default test suite (slow / gpu / slurm tests are opt-in markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${TOKENSIEVE_USE_CURRENT_ENV:-0}" = "1" ] || . .venv/bin/activate
export WANDB_MODE="${WANDB_MODE:-offline}"
# the tests use small tensors: one intra-op thread avoids oversubscribing a 2-core machine
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest "$@"
