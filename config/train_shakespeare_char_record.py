# The speedrun's next record: whole-split val under 1.50 within 3x the time of nanoGPT's CPU recipe (which stops at
# 1.90). The speedrun config (config/train_shakespeare_char_speedrun.py: 4 x 128, rotary, RMSNorm, QK-norm, logit
# softcap, Muon, WSD) trained to 880 steps with its decay ending at zero, evaluating only at the start and the end (the
# score that counts is tools/evaluate.py's whole split). On a 2-core Xeon with AMX (bf16), seeds 1337 / 1 / 2 gave
# 1.4793 / 1.4971 / 1.4922 (median 1.4922) at 2.84x / 2.84x / 3.12x nanoGPT's time in the same round (2.92x of the
# medians): docs/performance.md, from
# python tools/time_to_quality.py --nanogpt=PATH --runs=nanogpt,record --rounds=3 --seeds=1337,1,2
out_dir = "out-shakespeare-char-record"
eval_interval = 880
eval_iters = 8
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 128

n_layer = 4
n_head = 2
n_embd = 128
dropout = 0.0
bias = False

rotary = True
rmsnorm = True
qk_norm = True
logit_softcap = 15.0
activation = "gelu"
untied_head = False
value_embeddings = False

optimizer = "muon"
learning_rate = 2e-2
max_iters = 880
lr_schedule = "wsd"  # warmup, hold, then decay over the last 40%
decay_frac = 0.4
lr_decay_iters = 880
min_lr = 0.0  # the decay ends at zero (at 2e-3 the seeds gave 1.4861 / 1.5078 / 1.5009)
beta2 = 0.99
warmup_iters = 20

device = "cpu"
compile = False
