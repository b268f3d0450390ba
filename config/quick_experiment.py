# Quick experiment (tutorial ch01 7.1): does the pipeline run, does the loss fall? A 2-layer, 128-wide model.
# Expected time: about 20 seconds on a 2-core CPU, a few seconds on a GPU. Loss should fall from ~4.2 to ~2.3.
#   python train.py config/quick_experiment.py
out_dir = "out-quick"
dataset = "shakespeare_char"

batch_size = 16  # small batch: little memory
block_size = 64  # short context: fast
gradient_accumulation_steps = 1

n_layer = 2
n_head = 2
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 500
eval_interval = 100  # evaluate often
eval_iters = 20
# not in the tutorial's template: the default warmup (2000 steps) is longer than this whole run
warmup_iters = 50
lr_decay_iters = 500
min_lr = 1e-4
log_interval = 10
