# Fine-tune a character-level Shakespeare model to answer: chat turns from the play's dialogue (a speech, and the
# speech that answers it), the loss on the answers only. A few minutes on 2 CPU cores, offline:
#   python data/shakespeare_chat/prepare.py
#   python train.py config/train_shakespeare_char_fast.py --block_size=256 --out_dir=out-shakespeare-char-256   # base
#   python train.py config/finetune_chat_shakespeare.py
#   python sample.py --out_dir=out-shakespeare-chat --chat=True
# init_from another run's out_dir takes its best weights and its vocabulary (the chat tokens are added to the
# embedding), with a new optimizer and schedule, into a new out_dir.

init_from = "out-shakespeare-char-256"
out_dir = "out-shakespeare-chat"
dataset = "shakespeare_chat"
padding = True  # one whole conversation per row

block_size = 256
batch_size = 16
gradient_accumulation_steps = 1
dropout = 0.0

learning_rate = 1e-3
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
min_lr = 1e-4
beta2 = 0.99

eval_interval = 100
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

device = "cpu"
compile = False
