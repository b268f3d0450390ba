# The tutorial's quality on a CPU: tiny-shakespeare (characters) to a whole-split val loss under 1.60 (1.58) in
# under twice the time of nanoGPT's own CPU recipe (which stops near 1.90). Prepare the data first:
#   python data/shakespeare_char/prepare.py
#   python train.py config/train_shakespeare_char_speedrun.py && python sample.py --out_dir=out-shakespeare-char-speedrun
# Under 1.50 (about 5.6x nanoGPT's recipe's time): --max_iters=1000 --out_dir=out-shakespeare-char-speedrun-1000
# The model is the CPU recipe's size (4 layers x 128, 0.8M parameters) with those of the modern speedruns' options
# that pay at this length: rotary positions, RMSNorm, QK-norm and logit soft-capping (model.py).
# Such a model samples, evaluates, resumes, serves and fine-tunes like any other, but is no longer GPT-2's
# architecture, so tools/export_hf.py and tools/export_gguf.py refuse it.
# What each piece gains, the seeds and the time against nanoGPT: docs/performance.md (CPU speedrun);
# measured with python tools/time_to_quality.py --nanogpt=PATH --runs=nanogpt,speedrun --rounds=3 --seeds=1337,1,2

out_dir = "out-shakespeare-char-speedrun"
eval_interval = 300  # evaluations: at the start and the end only
eval_iters = 8  # evaluations are a large share of a CPU run: the score that counts is tools/evaluate.py's whole split
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 128

n_layer = 4
n_head = 2
n_embd = 128
dropout = 0.0  # 0.1 learns slower than it regularizes, in a 310-step run and at 1000 steps (docs/performance.md)
bias = False

rotary = True
rmsnorm = True
qk_norm = True
logit_softcap = 15.0
# measured at this length and left off, each better off (docs/performance.md): ReLU^2, an untied head, value embeddings
activation = "gelu"
untied_head = False
value_embeddings = False

optimizer = "muon"
learning_rate = 2e-2
max_iters = 300
lr_schedule = "wsd"  # warmup, hold, then decay over the last 40%
decay_frac = 0.4
lr_decay_iters = 300
min_lr = 2e-3
beta2 = 0.99
warmup_iters = 20

device = "cpu"
compile = False
