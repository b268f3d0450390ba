#!/usr/bin/env bash
# Experiment 2 (tutorial ch04 2.2): gradient accumulation equals a large batch. 64 x 1 and 16 x 4 see the same
# rows at every step (batches depend only on seed and step), so their curves differ only by float rounding
# and, with dropout on, by different dropout masks.
#   bash experiments/exp2_grad_accum.sh | SCALE=cpu bash experiments/exp2_grad_accum.sh | DEVICE=cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
run() { python tools/experiment.py run "$@"; }

# the tutorial's runs (their config has dropout 0.2). Evaluation uses eval_iters batches of batch_size rows, so
# the 16-row run gets 4x the eval batches: both are then scored on the very same rows.
run exp2_large_batch --batch_size=64 --gradient_accumulation_steps=1 --max_iters=500
run exp2_grad_accum  --batch_size=16 --gradient_accumulation_steps=4 --max_iters=500 --eval_iters=800
# The same pair with dropout off: nothing random is left, so the curves must agree to rounding.
run exp2_large_batch_nodropout --batch_size=64 --gradient_accumulation_steps=1 --max_iters=500 --dropout=0
run exp2_grad_accum_nodropout  --batch_size=16 --gradient_accumulation_steps=4 --max_iters=500 --dropout=0 --eval_iters=800

python tools/experiment.py finish exp2 --title "Experiment 2: batch {batch} accumulated"  # the runs' own sizes
# compare_runs.py exits 1 when the curves differ by more than the tolerance: the verdict is in its text, both run
{
  python tools/compare_runs.py experiments/exp2_large_batch experiments/exp2_grad_accum || true
  python tools/compare_runs.py experiments/exp2_large_batch_nodropout experiments/exp2_grad_accum_nodropout || true
} | tee experiments/exp2_compare.txt
