#!/usr/bin/env bash
# Experiment 6 (issue 17): AdamW against Muon (Muon for the blocks' matrices, AdamW for the rest), at equal steps
# (the two runs) and at equal time (exp6_comparison_time.png, and the report reads both at the same second).
#   bash experiments/exp6_optimizer.sh | SCALE=cpu bash experiments/exp6_optimizer.sh | DEVICE=cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
run() { python tools/experiment.py run "$@"; }

run exp6_adamw --max_iters=2000 --lr_decay_iters=2000
run exp6_muon  --max_iters=2000 --lr_decay_iters=2000 --optimizer=muon

python tools/experiment.py finish exp6 --title "Experiment 6: AdamW vs Muon" --by_time
