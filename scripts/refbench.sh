#!/usr/bin/env bash
# Step 2 of the README: the reference-benchmark table. Sets up (if needed), writes the refbench
# test split, then evaluates full, oracle, every training-free method and the shipped learned
# selectors (eval/refbench/selectors/*, trained against the shipped teacher) at 5/10/25/50 %
# of the visual tokens, and prints the table (also in OUT/results.md, OUT/results.json, OUT/pareto.png).
#
#   bash scripts/refbench.sh [OUT]          # default OUT runs/refbench/eval; LIMIT test clips (default 256)
#   RETRAIN=1 bash scripts/refbench.sh      # first write the train/val splits and retrain the five
#                                           # learned families from recipes/tiny/refbench_*.yaml (CPU: about an hour)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${TOKENSIEVE_USE_CURRENT_ENV:-0}" = "1" ] || . .venv/bin/activate
export WANDB_MODE="${WANDB_MODE:-offline}"

out="${1:-runs/refbench/eval}"
limit="${LIMIT:-256}"
shards=runs/refbench/shards
methods="flexselect qtsplus matryoshka vqtoken grpo"

if [ "${RETRAIN:-0}" = "1" ]; then
  python -m tokensieve.eval.refbench --out "$shards" --workers 2
  for m in $methods; do
    tokensieve fit --config "recipes/tiny/refbench_$m.yaml"
    tokensieve export "runs/refbench/$m/checkpoints/last.ckpt" "runs/refbench/$m/export"
  done
  learned=$(for m in $methods; do printf ',runs/refbench/%s/export' "$m"; done)
else
  # the test split alone (a pure function of the seed: the same clips as a full generation)
  python -m tokensieve.eval.refbench --out "$shards" --train 0 --val 0 --test "$limit" --workers 2
  learned=$(for m in $methods; do printf ',eval/refbench/selectors/%s' "$m"; done)
fi

tokensieve eval --data "$shards/test" --compressors "training-free$learned" \
  --budgets 0.05,0.1,0.25,0.5 --limit "$limit" --out "$out"
