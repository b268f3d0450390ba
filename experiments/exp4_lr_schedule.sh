#!/usr/bin/env bash
# Experiment 4 (tutorial ch04 2.4): what warmup and decay do. (decay_lr=False keeps the warmup and then holds
# the rate, so "warmup only" differs from "no schedule".)
#   bash experiments/exp4_lr_schedule.sh | SCALE=cpu bash experiments/exp4_lr_schedule.sh | DEVICE=cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
run() { python tools/experiment.py run "$@"; }

run exp4_no_schedule   --max_iters=2000 --warmup_iters=0 --decay_lr=False
run exp4_warmup_only   --max_iters=2000 --warmup_iters=100 --decay_lr=False
run exp4_decay_only    --max_iters=2000 --warmup_iters=0 --decay_lr=True --lr_decay_iters=2000
run exp4_full_schedule --max_iters=2000 --warmup_iters=100 --decay_lr=True --lr_decay_iters=2000

python tools/experiment.py finish exp4 --title "Experiment 4: learning-rate schedules"
python tools/plot_lr.py experiments/exp4_no_schedule experiments/exp4_warmup_only experiments/exp4_decay_only \
  experiments/exp4_full_schedule -o experiments/exp4_lr_schedules.png
