#!/usr/bin/env bash
# Experiment 7 (issue 30): which tokenizer? The same model trained for the same wall-clock time on tiny-shakespeare
# tokenized as characters, with GPT-2's BPE, and with byte-level BPEs of its own of 257 (bytes only), 1024 and 4096
# ids; compared by whole-split bits per byte (python tools/report.py experiments/ fills in the table), tokens per byte
# and samples. Sized for a CPU already (SCALE does not apply); BUDGET=seconds of training per run (default 60).
#   bash experiments/exp7_tokenizers.sh | BUDGET=120 bash experiments/exp7_tokenizers.sh | DEVICE=cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-60}
export SCALE=full
# the same model for every tokenizer (the embedding and output rows follow the vocabulary): 4 layers x 128, a context
# of 64 tokens (more text for a bigger vocabulary: the point of one), batch 32
MODEL=(--n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=32 --dropout=0.0 --learning_rate=3e-3
       --min_lr=3e-4 --beta2=0.99 --warmup_iters=50 --eval_iters=20)
TEXT=data/shakespeare_char/input.txt

[ -f data/shakespeare_char/meta.json ] || python data/shakespeare_char/prepare.py
[ -f data/shakespeare/meta.json ] || python data/shakespeare/prepare.py
for v in 257 1024 4096; do
  [ -f "data/shakespeare_bpe$v/meta.json" ] || python data/prepare_text.py --input="$TEXT" --name="shakespeare_bpe$v" \
    --tokenizer=bpe --vocab_size="$v"
done

for dataset in shakespeare_char shakespeare shakespeare_bpe257 shakespeare_bpe1024 shakespeare_bpe4096; do
  steps=$(python tools/experiment.py steps_for "$BUDGET" --dataset="$dataset" "${MODEL[@]}" ${DEVICE:+--device=$DEVICE})
  python tools/experiment.py run "exp7_${dataset#shakespeare_}" --dataset="$dataset" "${MODEL[@]}" \
    --max_iters="$steps" --lr_decay_iters="$steps" --eval_interval=$(( steps / 4 > 0 ? steps / 4 : 1 ))
done
python tools/experiment.py finish exp7 --title "Experiment 7: tokenizers (equal time; losses are per token)"
python tools/report.py experiments/
