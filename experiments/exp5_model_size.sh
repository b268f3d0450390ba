#!/usr/bin/env bash
# Experiment 5 (tutorial ch04 2.5): model capacity against loss, time and memory.
#   bash experiments/exp5_model_size.sh | SCALE=cpu bash experiments/exp5_model_size.sh | DEVICE=cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
run() { python tools/experiment.py run "$@"; }

run exp5_tiny   --n_layer=2 --n_head=2 --n_embd=128 --max_iters=3000
run exp5_small  --n_layer=4 --n_head=4 --n_embd=256 --max_iters=3000
run exp5_medium --n_layer=6 --n_head=6 --n_embd=384 --max_iters=3000
run exp5_large  --n_layer=8 --n_head=8 --n_embd=512 --max_iters=3000

python tools/experiment.py finish exp5 --title "Experiment 5: model size"
