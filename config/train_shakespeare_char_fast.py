# The CPU recipe to nanoGPT's quality in a fraction of its time: the same 0.8M model as
# config/train_shakespeare_char_cpu.py, trained with Muon (for the blocks' matrices; AdamW for the rest) on batches of
# 32 rows (bigger matmuls run faster per token on a CPU, and Muon's per-step cost is shared by more tokens) at a higher
# learning rate, for 240 steps instead of 2000. Whole-split val loss ~1.89 (nanoGPT's 2000-step recipe: ~1.90).
#   python train.py config/train_shakespeare_char_fast.py && python sample.py --out_dir=out-shakespeare-char-fast
# Figures and the side-by-side measurement: README, Performance (python tools/time_to_quality.py).

out_dir = "out-shakespeare-char-fast"
eval_interval = 120
eval_iters = 8  # 8 x 32 rows: as many as nanoGPT's 20 x 12
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

optimizer = "muon"
learning_rate = 2e-2  # whole-split val over seeds 1337 / 1 / 2: 1.882 / 1.882 / 1.893 (1.5e-2: 1.888 / 1.885 / 1.891)
max_iters = 240
lr_decay_iters = 240
min_lr = 2e-3
beta2 = 0.99
warmup_iters = 20  # 40 steps of warmup: 1.888 / 1.903 / 1.902 at 1.5e-2

device = "cpu"
compile = False
