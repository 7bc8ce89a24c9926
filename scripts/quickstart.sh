#!/usr/bin/env bash
# Set up, then run the whole workflow on the sample videos with the tiny Qwen2.5-VL backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${TOKENSIEVE_USE_CURRENT_ENV:-0}" = "1" ] || . .venv/bin/activate
export WANDB_MODE="${WANDB_MODE:-offline}"
tokensieve quickstart --out "${1:-runs/quickstart}"
