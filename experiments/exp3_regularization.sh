#!/usr/bin/env bash
# Experiment 3 (tutorial ch04 2.3): overfitting, and what dropout and weight decay do about it.
#   bash experiments/exp3_regularization.sh | SCALE=cpu bash experiments/exp3_regularization.sh | DEVICE=cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
# the tutorial's runs see tiny-shakespeare ~80 times (5000 x 64 x 256 tokens); a SCALE=cpu run sees 80x fewer
# tokens, about one pass, too few to overfit. To keep the point, SCALE=cpu also trains on 1/80 of train.bin.
data=()
if [ "${SCALE:-}" = cpu ]; then data=(--max_train_tokens=12500); fi
run() { python tools/experiment.py run "$@" "${data[@]}"; }

run exp3_overfit      --max_iters=5000 --dropout=0.0 --weight_decay=0.0
run exp3_dropout      --max_iters=5000 --dropout=0.2 --weight_decay=0.0
run exp3_weight_decay --max_iters=5000 --dropout=0.0 --weight_decay=0.1
run exp3_both         --max_iters=5000 --dropout=0.2 --weight_decay=0.1
# Not the tutorial's: the unregularised run again with another seed, the noise the report holds differences to.
run exp3_overfit_seed2 --max_iters=5000 --dropout=0.0 --weight_decay=0.0 --seed=1338

python tools/experiment.py finish exp3 --title "Experiment 3: overfitting and regularization"
