# Evaluate OpenAI's gpt2-medium weights on OpenWebText (train and val loss), nanoGPT's eval config.
#   python data/openwebtext/prepare.py
#   python train.py config/eval_gpt2_medium.py
batch_size = 8
eval_iters = 500  # more batches for a better estimate
eval_only = True
wandb_log = False
init_from = "gpt2-medium"
