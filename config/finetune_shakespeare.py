# nanoGPT's fine-tuning example: GPT-2 XL on tiny-shakespeare (GPT-2 BPE), 20 steps at a small constant rate.
#   python data/shakespeare/prepare.py
#   python train.py config/finetune_shakespeare.py
import time

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-" + str(time.time())

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2 (1.5B); needs the transformers package and a download

# keep only the best checkpoint
always_save_checkpoint = False

# 1 batch * 32 accumulation * 1024 tokens = 32,768 tokens per step; tiny-shakespeare has ~301k tokens,
# so one epoch is ~9.2 steps
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# fine-tune at a constant, small learning rate
learning_rate = 3e-5
decay_lr = False
