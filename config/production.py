# Production configuration (tutorial ch01 7.4): GPT-2 124M on OpenWebText, effective batch 12 x 1024 x 40
# = ~0.5M tokens per step. Expected time: about 4 days on 8 A100 GPUs
# (torchrun --standalone --nproc_per_node=8 train.py config/production.py); not a CPU job.
# Prepare the data first: python data/openwebtext/prepare.py (about 54 GB of downloads).
out_dir = "out-production"
dataset = "openwebtext"

batch_size = 12  # GPT-2's original setting
block_size = 1024  # long context
gradient_accumulation_steps = 40  # effective batch 480 sequences

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # GPT-2 pretraining uses no dropout

learning_rate = 6e-4
max_iters = 600000
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
eval_interval = 1000
eval_iters = 200
log_interval = 10
