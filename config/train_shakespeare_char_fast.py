# The CPU recipe's task to nanoGPT's quality in a fraction of its time: a model as wide as
# config/train_shakespeare_char_cpu.py's, with the same context, but 2 layers deep instead of 4 (at a budget this short,
# depth costs more time than it gives back: docs/performance.md), trained with Muon (for the blocks' matrices; AdamW
# for the rest) on batches of 32 rows (bigger matmuls run faster per token on a CPU, and Muon's per-step cost is shared
# by more tokens) at a higher learning rate, for 280 steps instead of 2000.
# Whole-split val loss ~1.85 in 14 s on the README's Xeon (nanoGPT's 2000-step recipe: ~1.90 in 66 s).
#   python train.py config/train_shakespeare_char_fast.py && python sample.py --out_dir=out-shakespeare-char-fast
# Figures and the side-by-side measurement: README, Performance (python tools/time_to_quality.py); the depth sweep
# it was chosen from: docs/performance.md.

out_dir = "out-shakespeare-char-fast"
eval_interval = 140
eval_iters = 8  # 8 x 32 rows: as many as nanoGPT's 20 x 12
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64

n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0

optimizer = "muon"
learning_rate = 2e-2  # whole-split val over seeds 1337 / 1 / 2: 1.855 / 1.866 / 1.875 (1.5e-2: 1.849 / 1.879 / 1.885)
max_iters = 280
lr_decay_iters = 280
min_lr = 2e-3
beta2 = 0.99
warmup_iters = 20  # chosen with 4 layers: 40 steps of warmup gave 1.888 / 1.903 / 1.902 at 1.5e-2

device = "cpu"
compile = False
