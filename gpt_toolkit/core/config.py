"""A training run's config: every key with its default and --help line (Config), reading config files and
--key=value overrides into it (load_config), and refusing impossible settings before any work (validate).

train.py and every tool that takes a training config read it here, so `--key=value` means the same everywhere.
"""
from dataclasses import dataclass

from configurator import defaults_of, help_of, parse_args
from gpt_toolkit.core.errors import ConfigError
from gpt_toolkit.core.hardware import DTYPE_CHOICES
from model import ACTIVATIONS, check_config

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # nanoGPT's names inside each block


@dataclass(frozen=True)
class Config:
    """A run's settings. The defaults are nanoGPT's (GPT-2 124M on OpenWebText); the comment after each key is its
    --help line. Frozen: a check never changes it, and what a resume takes from its checkpoint comes back as a new
    Config (dataclasses.replace)."""
    # I/O
    out_dir: str = "out"  # where ckpt.pt, training.log, metrics.jsonl and config.json are written
    eval_interval: int = 2000  # evaluate train and val loss every N optimizer steps (and after the last)
    log_interval: int = 1  # print the training loss every N steps
    eval_iters: int = 200  # batches of batch_size per split in each evaluation
    eval_only: bool = False  # evaluate once and exit
    eval_tasks: str = ""  # also score standard tasks at each evaluation: hellaswag, arc_easy, piqa, lambada or task files
    eval_tasks_limit: int = 100  # the first N items of each of eval_tasks (0 = all of them)
    always_save_checkpoint: bool = True  # save latest.pt at every evaluation (False: only when val improves and at the end)
    keep_last: int = 0  # also keep the last N saves as ckpt_stepNNNNNNNN.pt (0 = none)
    overwrite: bool = False  # let init_from=scratch/gpt2* replace the checkpoints already in out_dir (refused otherwise)
    verify_checkpoint: bool = True  # check a resumed checkpoint's checksum (False: load one that fails it anyway)
    init_from: str = "scratch"  # scratch | resume (out_dir/latest.pt) | gpt2, gpt2-medium/-large/-xl | an HF dir | a run's dir
    # logging
    wandb_log: bool = False  # log evaluations to Weights & Biases (needs: pip install wandb)
    wandb_project: str = "owt"  # W&B project name
    wandb_run_name: str = "gpt2"  # W&B run name
    tensorboard_log: bool = False  # write TensorBoard events to out_dir (needs: pip install tensorboard)
    # data
    dataset: str = "openwebtext"  # train on data_dir/<dataset>/train.bin and val.bin
    data_dir: str = "data"  # directory that holds the datasets
    max_train_tokens: int = 0  # train on only the first N tokens of train.bin (0 = all): a data-limited run overfits sooner
    gradient_accumulation_steps: int = 40  # micro-steps per optimizer step (shared out among DDP processes)
    batch_size: int = 12  # sequences per micro-step
    block_size: int = 1024  # context length in tokens
    # model
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block (must divide n_embd)
    n_embd: int = 768  # embedding width
    dropout: float = 0.0  # dropout probability in [0, 1): 0 for pretraining, 0.1+ for finetuning
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 has them)
    # opt-in model options (off: nanoGPT's GPT-2); with any of them, no GPT-2 export (docs/performance.md, CPU speedrun)
    rotary: bool = False  # rotary position embeddings instead of learned positions
    rmsnorm: bool = False  # RMSNorm instead of LayerNorm
    qk_norm: bool = False  # RMSNorm of each head's queries and keys
    activation: str = "gelu"  # the MLP's activation: gelu | relu2
    untied_head: bool = False  # an output layer of its own instead of the token embedding's
    value_embeddings: bool = False  # per-layer token embeddings added to the attention values
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c) for c > 0 (0 = off)
    # LoRA fine-tuning (of the weights init_from names)
    lora_rank: int = 0  # train rank-R updates of the blocks' matrices, the init_from weights frozen (0 = off: train them all)
    lora_alpha: float = 16.0  # the LoRA update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout probability on the LoRA adapters' input
    lora_targets: str = "c_attn,c_proj,c_fc"  # block matrices with adapters: c_attn, c_fc, c_proj (attn.c_proj/mlp.c_proj: one)
    # AdamW
    learning_rate: float = 6e-4  # peak learning rate (also --lr)
    max_iters: int = 600000  # optimizer steps to train
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' 2-D weights, AdamW for embeddings, head, biases, gains)
    weight_decay: float = 1e-1  # AdamW weight decay, on 2-D weights only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    # learning-rate schedule
    decay_lr: bool = True  # decay after warmup; False holds learning_rate after warmup
    lr_schedule: str = "cosine"  # cosine (nanoGPT) | wsd (warmup, hold, decay over the last decay_frac) | constant | exponential
    warmup_iters: int = 2000  # linear warmup steps
    lr_decay_iters: int = 600000  # cosine: step at which the decay reaches min_lr (usually max_iters)
    min_lr: float = 6e-5  # learning rate at the end of the decay (usually learning_rate / 10)
    decay_frac: float = 0.2  # wsd: the fraction of max_iters spent decaying to min_lr
    # training features
    early_stop_patience: int = 0  # stop after this many evaluations without val improvement (0 = off)
    early_stop_min_delta: float = 0.0  # an evaluation improves only if it lowers the best val loss by more than this
    mask_prob: float = 0.0  # replace this fraction of training input tokens (never targets, never eval) with mask_token
    mask_token: int = -1  # the id masked tokens become; -1 = a random token each time
    packing: bool = False  # keep attention inside each document of a row (needs an end-of-text token in the data)
    padding: bool = False  # rows of whole documents padded to the batch's longest, padding out of the loss (needs end-of-text)
    # diagnostics
    debug_data: bool = False  # before training: print a batch, decode it, check that Y is X shifted by one
    check_init: bool = False  # before training: compare the model's loss with ln(vocab_size), check logits for NaN/Inf
    grad_monitor_interval: int = 0  # every N steps log gradient norms, per-layer norms and the update ratio (0 = off)
    # system
    parallel: str = "ddp"  # under torchrun: ddp (each process holds the whole model) | fsdp (weights, gradients, AdamW sharded)
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bfloat16 on capable GPUs and CPUs, else float16 on GPUs, float32) | float32 | bfloat16 | float16
    compile: str | bool = "auto"  # torch.compile the model: auto (on for CUDA only) | True | False
    fused_adamw: bool = True  # the fused AdamW kernel where the device has one (CPU, CUDA, MPS)
    fast_cpu_attention: bool = True  # on CPU: explicit attention for bf16 and dropout, float32 for cached decoding (faster)
    keep_cpu_memory: bool = True  # on CPU: glibc's malloc keeps what a step frees for the next, instead of page-faulting it back
    seed: int = 1337  # seed for initialisation, batch sampling and dropout
    activation_checkpointing: bool = False  # recompute each block in the backward pass: one block's activations held, not all
    check_memory: bool = True  # before any work, refuse a run whose memory estimate cannot fit the device (with the fix)
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = a spec table for known GPUs, else a measured matmul

CHOICES = {
    "backend": ["auto", "nccl", "gloo"],
    "parallel": ["ddp", "fsdp"],
    "optimizer": ["adamw", "muon"],
    "dtype": DTYPE_CHOICES,
    "compile": ["auto", True, False],
    "lr_schedule": ["cosine", "wsd", "constant", "exponential"],
    "activation": list(ACTIVATIONS),
}
ALIASES = {"lr": "learning_rate"}
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take it, plus the rank (torchrun's processes: seed + rank)
MAX_STEPS = 10**12  # a trillion steps: far past any run, short of what the clock and the estimates can hold
USAGE = "usage: python train.py [CONFIG_FILE ...] [--key=value ...]"


def load_config(argv):
    """(Config, keys given as --key=value) from a command line; ConfigError on bad input."""
    config, cli_keys = parse_args(argv, defaults_of(Config), help_of(Config), CHOICES, ALIASES, USAGE)
    return Config(**config), cli_keys


def parse_targets(text):
    """('c_attn', 'c_proj', ...) from 'c_attn,c_proj'; ValueError naming what is not a block's matrix."""
    targets = tuple(t.strip() for t in str(text).split(",") if t.strip())
    known = {part for name in BLOCK_LINEARS for part in (name, name.split(".")[1])}
    unknown = [t for t in targets if t not in known]
    if not targets or unknown:
        raise ValueError(f"lora_targets={text!r}: {', '.join(unknown) or 'no target'} is not a matrix of a block; use "
                         f"names from {', '.join(sorted(known))} (c_proj is both attn.c_proj and mlp.c_proj)")
    return targets


def validate(cfg):
    """Catch impossible settings before any work, each with a message naming the key and a fix."""
    for key in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
                "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr", "seed", "peak_flops",
                "max_train_tokens", "keep_last", "early_stop_patience", "early_stop_min_delta", "grad_monitor_interval",
                "eval_tasks_limit"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must not be negative")
    if cfg.seed > MAX_SEED:
        raise ConfigError(f"seed={cfg.seed} is too large: use a seed from 0 to {MAX_SEED}")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "eval_interval", "log_interval", "grad_monitor_interval"):
        if getattr(cfg, key) > MAX_STEPS:
            raise ConfigError(f"{key}={getattr(cfg, key)} is more steps than a run can take: use at most {MAX_STEPS:,}")
    if cfg.peak_flops and not 1e6 <= cfg.peak_flops <= 1e21:
        raise ConfigError(f"peak_flops={cfg.peak_flops:g} is not a device's FLOP/s (1e6 to 1e21): give the device's "
                          f"peak, e.g. 312e12 for an A100's bfloat16, or 0 to have it looked up or measured")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate={cfg.learning_rate} must be positive")
    try:  # the model's own checks, written once (model.py): heads, activation, rotary, softcap
        check_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")
    for key in ("beta1", "beta2", "mask_prob"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be in [0, 1)")
    if cfg.lr_schedule == "exponential" and not 0 < cfg.min_lr < cfg.learning_rate:
        raise ConfigError(f"lr_schedule=exponential grows from min_lr to learning_rate: it needs 0 < min_lr < "
                          f"learning_rate (got min_lr={cfg.min_lr}, learning_rate={cfg.learning_rate})")
    if not 0.0 < cfg.decay_frac <= 1.0:
        raise ConfigError(f"decay_frac={cfg.decay_frac} must be in (0, 1]")
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp":
        raise ConfigError("optimizer=muon needs each weight matrix whole, and parallel=fsdp shards them: use "
                          "--parallel=ddp with Muon, or AdamW with FSDP")
    if cfg.packing and cfg.padding:
        raise ConfigError("packing=True and padding=True are two ways of batching documents: choose one")
    if cfg.eval_tasks and cfg.parallel == "fsdp":
        raise ConfigError("eval_tasks scores the whole model on rank 0, and parallel=fsdp shards it: score the saved "
                          "checkpoint with tools/evaluate.py --tasks=... instead, or use --parallel=ddp")
    validate_lora(cfg)
    if cfg.mask_token < -1:
        raise ConfigError(f"mask_token={cfg.mask_token} must be a token id, or -1 for a random token")


def validate_lora(cfg):
    """The LoRA keys: settings LoRA can use (that its base exists is source.ModelSource.for_training's check)."""
    if cfg.lora_rank < 0:
        raise ConfigError(f"lora_rank={cfg.lora_rank} must not be negative (0 trains every weight)")
    if not cfg.lora_rank:
        return
    if not cfg.lora_alpha > 0:
        raise ConfigError(f"lora_alpha={cfg.lora_alpha} must be positive (the update is scaled by lora_alpha / lora_rank)")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout={cfg.lora_dropout} must be in [0, 1)")
    try:
        parse_targets(cfg.lora_targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.parallel == "fsdp":
        raise ConfigError("LoRA trains adapters over frozen weights that each process holds whole: use --parallel=ddp "
                          "(the frozen weights need no gradients or optimizer state to shard)")
