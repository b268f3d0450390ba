# Standard configuration (tutorial ch01 7.3): Shakespeare-quality text, the 6-layer, 384-wide model (10.65M),
# the same as config/train_shakespeare_char.py. Expected time: about 3 minutes on a modern GPU (val ~1.47);
# on a 2-core CPU about 8 hours at 6 s per iteration (the tutorial: 3-4 hours on a consumer GPU).
#   python train.py config/standard.py
out_dir = "out-standard"
dataset = "shakespeare_char"

batch_size = 64
block_size = 256
gradient_accumulation_steps = 1

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 5000
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 1e-4
# not in the tutorial's template, as in train_shakespeare_char.py
beta2 = 0.99
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False
