# The CPU recipe to nanoGPT's quality in a fraction of its time: the same 0.8M model and batches as
# config/train_shakespeare_char_cpu.py, trained with Muon (for the blocks' matrices; AdamW for the rest) at a
# higher learning rate for 600 steps instead of 2000. Whole-split val loss ~1.87 (nanoGPT's 2000-step recipe: ~1.90).
#   python train.py config/train_shakespeare_char_fast.py && python sample.py --out_dir=out-shakespeare-char-fast
# Figures and the side-by-side measurement: README, Performance (python tools/time_to_quality.py).

out_dir = "out-shakespeare-char-fast"
eval_interval = 200
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

optimizer = "muon"
learning_rate = 6e-3  # measured on 600 steps: 3e-3 -> val 1.953, 6e-3 -> 1.867 (whole split)
max_iters = 600
lr_decay_iters = 600
min_lr = 6e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
compile = False
