# Learning configuration (tutorial ch01 7.2): decent text in reasonable time. A 4-layer, 256-wide model (3.2M).
# Expected time: about 50 minutes on a 2-core CPU (0.95 s per iteration; the tutorial: 1 hour), a few minutes on a GPU.
#   python train.py config/learning.py
out_dir = "out-learning"
dataset = "shakespeare_char"

batch_size = 32
block_size = 128
gradient_accumulation_steps = 2  # effective batch 64

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.1

learning_rate = 1e-3
max_iters = 3000
warmup_iters = 100
eval_interval = 250
# not in the tutorial's template: decay over the run, to a tenth of the peak rate
lr_decay_iters = 3000
min_lr = 1e-4
eval_iters = 100
log_interval = 10
always_save_checkpoint = False
