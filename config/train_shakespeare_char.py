# A baby GPT (6 layers, 384 wide, 10.65M parameters) on tiny-shakespeare, character level.
# Prepare the data first:  python data/shakespeare_char/prepare.py
# On a GPU: about 3 minutes to val loss ~1.47. On a CPU use config/train_shakespeare_char_cpu.py instead.

out_dir = "out-shakespeare-char"
eval_interval = 250  # frequent, because this small dataset overfits
eval_iters = 200
log_interval = 10

# it will overfit, so keep the checkpoint with the best val loss only
always_save_checkpoint = False

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # up to 256 previous characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small network can take a higher rate
max_iters = 5000
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # a bit higher, because each step sees few tokens

warmup_iters = 100
