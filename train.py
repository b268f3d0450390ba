"""Train a GPT.

One process (CPU, one GPU, or Apple MPS):
    python train.py config/train_shakespeare_char.py --max_iters=1000 --out_dir=out-test
Several processes with DDP (gloo on CPU, nccl on CUDA):
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py

Every key of Config below can be set by a config file or --key=value; `python train.py --help` lists them.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hardware
import memory
from checkpoint import (
    ARCHITECTURE,
    BEST,
    LATEST,
    MODEL_ARGS,
    existing_checkpoints,
    link_checkpoint,
    load_checkpoint,
    remove_stale_temps,
    resume_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_name,
)
from configurator import defaults_of, format_config, help_of, parse_args
from dataset import GPT2_VOCAB_SIZE, Dataset, eval_offsets, get_batch, tokenizer_from_meta, train_offsets
from diagnostics import NAN_DIAGNOSIS, GradMonitor, check_batch, check_init, grad_warnings
from errors import ConfigError, UserError, import_optional, run_main
from model import GPT, GPT2_PADDED_VOCAB, GPT2_SIZES, GPTConfig
from runlog import RunLog, TensorBoardTracker, WandbTracker, eval_line, iter_line, took_line


class Config:
    """Defaults (nanoGPT's: GPT-2 124M on OpenWebText). The comment after each key is its --help line."""
    # I/O
    out_dir = "out"  # where ckpt.pt, training.log, metrics.jsonl and config.json are written
    eval_interval = 2000  # evaluate train and val loss every N optimizer steps (and after the last)
    log_interval = 1  # print the training loss every N steps
    eval_iters = 200  # batches of batch_size per split in each evaluation
    eval_only = False  # evaluate once and exit
    always_save_checkpoint = True  # save latest.pt at every evaluation (False: only when val improves and at the end)
    keep_last = 0  # also keep the last N saves as ckpt_stepNNNNNNNN.pt (0 = none)
    overwrite = False  # let init_from=scratch/gpt2* replace the checkpoints already in out_dir (refused otherwise)
    init_from = "scratch"  # scratch | resume (from out_dir/latest.pt, else ckpt.pt) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    # logging
    wandb_log = False  # log evaluations to Weights & Biases (needs: pip install wandb)
    wandb_project = "owt"  # W&B project name
    wandb_run_name = "gpt2"  # W&B run name
    tensorboard_log = False  # write TensorBoard events to out_dir (needs: pip install tensorboard)
    # data
    dataset = "openwebtext"  # train on data_dir/<dataset>/train.bin and val.bin
    data_dir = "data"  # directory that holds the datasets
    max_train_tokens = 0  # train on only the first N tokens of train.bin (0 = all): a data-limited run overfits sooner
    gradient_accumulation_steps = 40  # micro-steps per optimizer step (shared out among DDP processes)
    batch_size = 12  # sequences per micro-step
    block_size = 1024  # context length in tokens
    # model
    n_layer = 12  # transformer blocks
    n_head = 12  # attention heads per block (must divide n_embd)
    n_embd = 768  # embedding width
    dropout = 0.0  # dropout probability in [0, 1): 0 for pretraining, 0.1+ for finetuning
    bias = False  # biases in Linear and LayerNorm layers (GPT-2 has them)
    # AdamW
    learning_rate = 6e-4  # peak learning rate (also --lr)
    max_iters = 600000  # optimizer steps to train
    weight_decay = 1e-1  # AdamW weight decay, on 2-D weights only
    beta1 = 0.9  # AdamW beta1
    beta2 = 0.95  # AdamW beta2
    grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
    # learning-rate schedule
    decay_lr = True  # decay after warmup; False holds learning_rate after warmup
    lr_schedule = "cosine"  # cosine (nanoGPT) | wsd (warmup, hold, decay over the last decay_frac) | constant
    warmup_iters = 2000  # linear warmup steps
    lr_decay_iters = 600000  # cosine: step at which the decay reaches min_lr (usually max_iters)
    min_lr = 6e-5  # learning rate at the end of the decay (usually learning_rate / 10)
    decay_frac = 0.2  # wsd: the fraction of max_iters spent decaying to min_lr
    # training features
    early_stop_patience = 0  # stop after this many evaluations without val improvement (0 = off)
    early_stop_min_delta = 0.0  # an evaluation improves only if it lowers the best val loss by more than this
    mask_prob = 0.0  # replace this fraction of training input tokens (never targets, never eval) with mask_token
    mask_token = -1  # the id masked tokens become; -1 = a random token each time
    packing = False  # keep attention inside each document of a row (needs an end-of-text token in the data)
    # diagnostics
    debug_data = False  # before training: print a batch, decode it, check that Y is X shifted by one
    check_init = False  # before training: compare the model's loss with ln(vocab_size), check logits for NaN/Inf
    grad_monitor_interval = 0  # every N steps log gradient norms, per-layer norms and the update ratio (0 = off)
    # system
    backend = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    device = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    dtype = "auto"  # auto (bfloat16 on capable GPUs and CPUs, else float16 on GPUs, float32) | float32 | bfloat16 | float16
    compile = "auto"  # torch.compile the model: auto (on for CUDA only) | True | False
    fused_adamw = True  # the fused AdamW kernel where the device has one (CPU, CUDA, MPS)
    fast_cpu_attention = True  # on CPU: explicit attention for bf16 and dropout, float32 for cached decoding (faster)
    seed = 1337  # seed for initialisation, batch sampling and dropout
    check_memory = True  # before any work, refuse a run whose memory estimate cannot fit the device (with the fix)
    peak_flops = 0.0  # device peak FLOP/s for MFU; 0 = a spec table for known GPUs, else a measured matmul


CHOICES = {
    "init_from": ["scratch", "resume", *GPT2_SIZES],
    "backend": ["auto", "nccl", "gloo"],
    "dtype": ["auto", "float32", "bfloat16", "float16"],
    "compile": ["auto", True, False],
    "lr_schedule": ["cosine", "wsd", "constant"],
}
ALIASES = {"lr": "learning_rate"}
# float16: the GradScaler halves its scale and skips the step at each inf/NaN gradient. A few skips are normal
# (the scale starts at 2**16 and finds its level); this many in a row mean the gradients themselves are broken.
MAX_SKIPPED_STEPS = 25
USAGE = "usage: python train.py [CONFIG_FILE ...] [--key=value ...]"


def load_config(argv):
    """(config namespace, keys given as --key=value) from a command line; ConfigError on bad input."""
    config, cli_keys = parse_args(argv, defaults_of(Config), help_of(Config), CHOICES, ALIASES, USAGE)
    return SimpleNamespace(**config), cli_keys


def validate(cfg):
    """Catch impossible settings before any work, each with a message naming the key and a fix."""
    for key in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
                "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr", "seed", "peak_flops",
                "max_train_tokens", "keep_last", "early_stop_patience", "early_stop_min_delta", "grad_monitor_interval"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must not be negative")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate={cfg.learning_rate} must be positive")
    if cfg.n_embd % cfg.n_head:
        fits = [h for h in range(1, 65) if cfg.n_embd % h == 0]
        raise ConfigError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: each head needs n_embd/n_head "
                          f"dimensions; use an n_head from {fits} or change n_embd")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")
    for key in ("beta1", "beta2", "mask_prob"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be in [0, 1)")
    if not 0.0 < cfg.decay_frac <= 1.0:
        raise ConfigError(f"decay_frac={cfg.decay_frac} must be in (0, 1]")
    if cfg.mask_token < -1:
        raise ConfigError(f"mask_token={cfg.mask_token} must be a token id, or -1 for a random token")


# ----------------------------------------------------------------------------- schedule, batches, evaluation

def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True, schedule="cosine",
           max_iters=None, decay_frac=0.2):
    """Learning rate for optimizer step `it` (0-based). All schedules start with a linear warmup from
    learning_rate/(warmup_iters+1) (never 0) to learning_rate at warmup_iters. Then
      cosine:   nanoGPT's cosine from learning_rate at warmup_iters to min_lr at lr_decay_iters, then min_lr;
      wsd:      hold learning_rate, then a cosine to min_lr over the last decay_frac of max_iters
                (warmup-stable-decay, tutorial ch01 4.2);
      constant: hold learning_rate (also what decay_lr=False gives)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr or schedule == "constant":
        return learning_rate
    if schedule == "wsd":
        decay_start = max(warmup_iters, max_iters - round(decay_frac * max_iters))
        if it < decay_start:
            return learning_rate
        decay_ratio = min(1.0, (it - decay_start) / max(1, max_iters - decay_start))
    else:
        if it >= lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def lr_at(cfg, it):
    """get_lr with a run's config (an object with the Config keys)."""
    return get_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr, cfg.decay_lr,
                  cfg.lr_schedule, cfg.max_iters, cfg.decay_frac)


def step_batches(data, step, batch_size, accum_steps, block_size, seed, device, rank=0, world_size=1, vocab_size=None,
                 mask_prob=0.0, mask_token=-1):
    """This process's micro-batches [(X, Y), ...] for optimizer step `step`.

    All batch_size * accum_steps rows of the step are drawn at once from (seed, step), then cut into
    micro-batches and dealt to DDP ranks in order, so how a step is split never changes its rows.
    mask_prob > 0 replaces that fraction of the inputs X (never the targets Y) with mask_token, or with a
    random token when mask_token is -1 (BERT-style augmentation, tutorial's challenge 5)."""
    offsets = train_offsets(seed, step, batch_size * accum_steps, len(data), block_size)
    per_rank = accum_steps // world_size
    mine = offsets.reshape(accum_steps, batch_size)[rank * per_rank:(rank + 1) * per_rank].reshape(-1)
    X, Y = get_batch(data, mine, block_size, device, vocab_size)
    if mask_prob > 0:
        X = X.clone()  # X and Y are views of one buffer: masking X in place would change Y
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, step, rank]))
        masked = torch.from_numpy(rng.random(tuple(X.shape)) < mask_prob).to(X.device)
        if mask_token == -1:
            fill = torch.from_numpy(rng.integers(0, vocab_size, size=tuple(X.shape))).to(X.device)
            X = torch.where(masked, fill, X)
        else:
            X = X.masked_fill(masked, mask_token)
    return list(zip(X.split(batch_size), Y.split(batch_size)))


@torch.no_grad()
def estimate_loss(model, dataset, eval_iters, batch_size, block_size, seed, device, ctx, vocab_size=None, doc_sep=None):
    """Mean loss over eval_iters fixed batches per split ({'train': x, 'val': y}), model in eval mode."""
    was_training = model.training
    model.eval()
    out = {}
    for split, data in dataset.splits.items():
        offsets = eval_offsets(seed, split, eval_iters * batch_size, len(data), block_size)
        total = torch.zeros((), device=device)
        for rows in offsets.reshape(eval_iters, batch_size):
            X, Y = get_batch(data, rows, block_size, device, vocab_size)
            with ctx:
                _, loss = model(X, Y, doc_sep)
            total += loss.float()
        out[split] = total.item() / eval_iters  # one host sync per split
    model.train(was_training)
    return out


def forward_backward(model, micro_batches, ctx, scaler, doc_sep=None):
    """Accumulate the gradient of the mean loss over micro_batches. Returns that mean loss as a tensor
    (no host sync). Under DDP, gradients are all-reduced only on the last micro-step."""
    n = len(micro_batches)
    total = None
    for i, (X, Y) in enumerate(micro_batches):
        no_sync = model.no_sync() if isinstance(model, DDP) and i < n - 1 else contextlib.nullcontext()
        with no_sync:
            with ctx:
                _, loss = model(X, Y, doc_sep)
                loss = loss / n  # gradients add up over micro-steps; this makes them a mean
            scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Clip, step, and zero the gradients (already unscaled with scaler.unscale_). Returns (the gradient norm
    before clipping, a tensor, or None when grad_clip is 0; whether the float16 GradScaler skipped the step for
    inf/NaN gradients, a bool tensor, or None without a scaler)."""
    norm = None
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scale = scaler._scale.clone() if scaler.is_enabled() else None  # the scaler lowers its scale when it skips
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm, (scaler._scale < scale if scale is not None else None)


def train_step(model, optimizer, scaler, micro_batches, ctx, grad_clip, doc_sep=None):
    """One optimizer step for the tools (lr_finder, estimate, bench): forward-backward over the micro-batches,
    unscale, clip, step. Returns the mean loss (a tensor). The training loop spells these out, because the
    gradient monitor looks at the gradients between unscaling and stepping."""
    loss = forward_backward(model, micro_batches, ctx, scaler, doc_sep)
    scaler.unscale_(optimizer)
    optimizer_step(model, optimizer, scaler, grad_clip)
    return loss


# ----------------------------------------------------------------------------- model and run setup

def check_resume(ckpt, cfg, cli_keys, dataset):
    """A resume continues the run in the checkpoint: refuse flags and data that contradict it, and take its
    architecture (so the log and the saved config tell the truth)."""
    args = ckpt["model_args"]
    for key in ARCHITECTURE:
        if key in cli_keys and getattr(cfg, key) != args[key]:
            raise UserError(f"checkpoint has {key}={args[key]} but --{key}={getattr(cfg, key)} was given: drop --{key} "
                            f"to resume this run, or train a new model in another --out_dir")
        setattr(cfg, key, args[key])
    trained_on = ckpt.get("config", {}).get("dataset")
    if trained_on and trained_on != cfg.dataset:
        raise UserError(f"checkpoint was trained on dataset '{trained_on}' but this run uses '{cfg.dataset}': "
                        f"resume with --dataset={trained_on}, or start a new run in another --out_dir")
    if ckpt.get("meta") is not None and dataset.meta is not None and ckpt["meta"] != dataset.meta:
        raise UserError(f"dataset '{cfg.dataset}' vocabulary differs from the checkpoint's (was the data prepared again "
                        f"from other text?): resume on the data the model was trained on")


def scratch_model_args(cfg, vocab_size):
    """GPTConfig fields of a fresh model with cfg's architecture: what init_from=scratch trains."""
    return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size, bias=cfg.bias,
                vocab_size=vocab_size, dropout=cfg.dropout)


def build_model(cfg, dataset, ckpt):
    """(model, model_args, notes to log) for cfg.init_from; ckpt is the loaded checkpoint when resuming."""
    notes = []
    if cfg.init_from == "scratch":
        vocab_size = dataset.vocab_size
        if vocab_size is None:
            vocab_size = GPT2_PADDED_VOCAB
            notes.append(f"no vocabulary file in the dataset: using GPT-2's vocab_size {vocab_size} (50257 padded to a "
                         f"multiple of 64)")
        model_args = scratch_model_args(cfg, vocab_size)
        model = GPT(GPTConfig(**model_args))
    elif cfg.init_from == "resume":
        model_args = {**{k: ckpt["model_args"][k] for k in MODEL_ARGS if k in ckpt["model_args"]}, "dropout": cfg.dropout}
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(ckpt["model"])
    else:
        notes.append(f"initializing from OpenAI GPT-2 weights: {cfg.init_from}")
        model = GPT.from_pretrained(cfg.init_from, dict(dropout=cfg.dropout))
        model_args = {k: getattr(model.config, k) for k in MODEL_ARGS}
    model.config.fast_cpu_attention = cfg.fast_cpu_attention
    if dataset.vocab_size is not None and dataset.vocab_size > model_args["vocab_size"]:
        raise UserError(f"dataset '{cfg.dataset}' has {dataset.vocab_size} tokens but the model's vocab_size is "
                        f"{model_args['vocab_size']}: use a dataset with the model's tokenizer")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
        model_args["block_size"] = cfg.block_size
    elif cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} is larger than the model's {model.config.block_size}: "
                        f"use --block_size={model.config.block_size} or less")
    return model, model_args, notes


def planned_model_args(cfg, dataset, ckpt):
    """The GPTConfig fields build_model will use, known before building it."""
    if cfg.init_from == "scratch":
        return scratch_model_args(cfg, dataset.vocab_size or GPT2_PADDED_VOCAB)
    if cfg.init_from == "resume":
        return {**ckpt["model_args"], "dropout": cfg.dropout}
    return dict(GPT2_SIZES[cfg.init_from], block_size=min(cfg.block_size, 1024), bias=True, vocab_size=GPT2_VOCAB_SIZE,
                dropout=cfg.dropout)


def check_memory(cfg, dataset, ckpt, device, dtype, world_size):
    """Refuse a run that cannot fit before the model is built (building it alone can take minutes or fail)."""
    args = planned_model_args(cfg, dataset, ckpt)
    shape = SimpleNamespace(**{**vars(cfg), **args})
    n_params = memory.param_count(n_layer=args["n_layer"], n_embd=args["n_embd"], block_size=args["block_size"],
                                  vocab_size=args["vocab_size"], bias=args["bias"])
    sharing = memory.processes_on_this_machine() if hardware.device_type(device) == "cpu" else 1
    memory.check_fits(shape, n_params=n_params, vocab_size=args["vocab_size"], dtype=dtype, device=device,
                      processes=min(sharing, world_size))


def check_out_dir(cfg):
    """Refuse to replace an earlier run's checkpoints without --overwrite=True, and an out_dir that cannot be
    written. Writes nothing."""
    out_dir = Path(cfg.out_dir)
    found = existing_checkpoints(out_dir) if out_dir.is_dir() else []
    if found and cfg.init_from != "resume" and not cfg.eval_only and not cfg.overwrite:
        raise UserError(f"out_dir '{out_dir}' already holds a checkpoint ({found[-1].name}): continue it with "
                        f"--init_from=resume, choose another --out_dir, or pass --overwrite=True to replace it")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        reason = "a file is in the way" if not existing.is_dir() else "permission denied"
        raise UserError(f"cannot write to out_dir '{out_dir}' ({reason} at {existing}): choose another --out_dir")


def open_out_dir(cfg):
    """Create out_dir, drop temp files of a killed write, and with --overwrite=True the old checkpoints."""
    out_dir = Path(cfg.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to out_dir '{out_dir}' ({e.strerror}): choose another --out_dir") from None
    remove_stale_temps(out_dir)
    if cfg.overwrite and cfg.init_from != "resume" and not cfg.eval_only:
        for path in existing_checkpoints(out_dir):
            path.unlink()


def setup_ddp(cfg):
    """(rank, local_rank, world_size) when launched by torchrun, else (0, 0, 1)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                          f"{world_size} DDP processes: each process runs an equal share of the micro-steps")
    return rank, local_rank, world_size


def agree_with_master(flag, device):
    """Rank 0's decision, on every DDP rank (a collective)."""
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_rng_states(device, world_size):
    """Every process's RNG state, in rank order (a collective: all DDP ranks call it at the same step)."""
    mine = rng_state(device)
    if world_size == 1:
        return [mine]
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


class StopRequest:
    """SIGINT/SIGTERM: the first asks the loop to finish the current step, save and exit 128+signal;
    a second one aborts at once (KeyboardInterrupt, exit 130)."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            # once a stop is under way the process is saving and exiting: a late signal must not interrupt that
            signal.signal(sig, signal.SIG_IGN if self.signum else handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler can run in the middle of another print
        os.write(sys.stderr.fileno(), f"\n{signal.Signals(signum).name}: finishing this step, then saving "
                                      f"(send it again to abort without saving)\n".encode())

    def agreed(self, world_size, device):
        """The stop signal if any process got one: all DDP ranks must stop after the same step."""
        if world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


# ----------------------------------------------------------------------------- training

def main(argv):
    # everything that can fail on bad input is checked before anything is written
    cfg, cli_keys = load_config(argv)
    validate(cfg)
    wandb = import_optional("wandb", "wandb_log=True") if cfg.wandb_log else None
    if cfg.tensorboard_log:
        import_optional("tensorboard", "tensorboard_log=True")
    if cfg.init_from in GPT2_SIZES:
        import_optional("transformers", f"init_from={cfg.init_from}")
    rank, local_rank, world_size = setup_ddp(cfg)
    master = rank == 0
    device = cfg.device
    if world_size > 1 and cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    device = hardware.resolve_device(device)
    device_type = hardware.device_type(device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    use_compile = hardware.resolve_compile(cfg.compile, device)
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    ckpt = None
    if cfg.init_from == "resume":
        ckpt_path = resume_path(cfg.out_dir)
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_resume(ckpt, cfg, cli_keys, dataset)
    dataset.check_block_size(cfg.block_size)
    if cfg.check_memory:
        check_memory(cfg, dataset, ckpt, device, dtype, world_size)
    check_out_dir(cfg)
    torch.manual_seed(cfg.seed + rank)
    model, model_args, notes = build_model(cfg, dataset, ckpt)
    vocab_size = model_args["vocab_size"]
    dataset.check_token_ids(vocab_size)
    if cfg.mask_token >= vocab_size:
        raise ConfigError(f"mask_token={cfg.mask_token} must be below the model's vocab_size {vocab_size} (or -1 for random)")
    doc_sep = None
    if cfg.packing:
        doc_sep = dataset.eot_token
        if doc_sep is None:
            raise UserError(f"packing=True needs documents separated by an end-of-text token, and '{cfg.dataset}' has none "
                            f"(character datasets never do): use a GPT-2 tokenized dataset, e.g. data/prepare_text.py "
                            f"--tokenizer=gpt2 on text with <|endoftext|> between documents")

    # from here on the run writes to out_dir
    if master:
        open_out_dir(cfg)
    if world_size > 1:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
        if device_type == "cuda":
            torch.cuda.set_device(device)
    trackers = []
    if master and cfg.tensorboard_log:
        trackers.append(TensorBoardTracker(cfg.out_dir))
    if master and cfg.wandb_log:
        trackers.append(WandbTracker(wandb, cfg.wandb_project, cfg.wandb_run_name, vars(cfg)))
    log = RunLog(cfg.out_dir, append=cfg.init_from == "resume", enabled=master, trackers=trackers)
    log.print("config:\n" + format_config(vars(cfg)))
    for note in notes:
        log.print(note)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    ctx = hardware.autocast(device, dtype)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    log.print(f"device {device}, dtype {dtype}, compile {use_compile}, {world_size} process(es); "
              f"tokens per iteration: {tokens_per_iter:,}")
    model.to(device)
    log.print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    scaler = hardware.grad_scaler(device, dtype)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                           fused=None if cfg.fused_adamw else False)
    iter_num, best_val_loss, resumed_at, saved_rng = 0, float("inf"), None, None
    early = {"best": float("inf"), "best_step": 0, "evals_without_improvement": 0}  # early-stopping state
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        iter_num = resumed_at = ckpt["iter_num"]
        best_val_loss = float(ckpt["best_val_loss"])
        early.update(ckpt.get("early_stop", {}))
        saved_rng = ckpt.get("rng")
        if not saved_rng or len(saved_rng) != world_size:
            saved_rng = None
            log.print(f"the checkpoint has no RNG state for {world_size} process(es): dropout masks will differ "
                      f"from an uninterrupted run")
        log.print(f"resuming from {ckpt_path} at step {iter_num}")
    del ckpt
    raw_model = model
    if use_compile:
        log.print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    eval_model = model.module if isinstance(model, DDP) else model
    out_dir = Path(cfg.out_dir)

    if master:
        run_info = dict(vars(cfg), resolved_device=device, resolved_dtype=dtype, resolved_compile=use_compile,
                        world_size=world_size, num_params=raw_model.get_num_params())
        with open(out_dir / "config.json", "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2)
    peak = cfg.peak_flops or 1.0  # only rank 0 logs MFU, so only it measures the peak
    if master:
        peak, peak_source = (cfg.peak_flops, "--peak_flops") if cfg.peak_flops else hardware.peak_flops(device, dtype)
        log.print(f"MFU is measured against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    per_rank_accum = cfg.gradient_accumulation_steps // world_size
    flops_per_iter = raw_model.flops_per_token(cfg.block_size) * cfg.block_size * cfg.batch_size * per_rank_accum
    train_data = dataset.splits["train"]

    last_saved = {"step": resumed_at}

    def save(step, improved, rng_states):
        """latest.pt always; ckpt.pt only when val improved; a rolling copy with --keep_last."""
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                 "iter_num": step, "best_val_loss": best_val_loss, "config": vars(cfg), "scaler": scaler.state_dict(),
                 "rng": rng_states, "sampler": {"kind": "seed_and_step", "seed": cfg.seed, "next_step": step},
                 "early_stop": dict(early), "meta": dataset.meta}
        save_checkpoint(state, out_dir / LATEST)
        written = [LATEST]
        if improved:
            link_checkpoint(out_dir / LATEST, out_dir / BEST)
            written.append(BEST)
        if cfg.keep_last:
            link_checkpoint(out_dir / LATEST, out_dir / step_name(step))
            for old in sorted(out_dir.glob("ckpt_step*.pt"))[:-cfg.keep_last]:
                old.unlink()
        last_saved["step"] = step
        log.print(f"saving checkpoint to {cfg.out_dir} ({', '.join(written)})")

    def kept_checkpoint():
        return (f"the last checkpoint ({out_dir / LATEST}, step {last_saved['step']}) is from before and untouched"
                if last_saved["step"] is not None else "no checkpoint had been saved yet")

    def stop_for_nonfinite(step):
        """The NaN/Inf guard: stop before anything broken is evaluated or saved, with the tutorial's diagnosis."""
        log.print(f"training stopped: the loss or the gradients became NaN/Inf by step {step}")
        if scaler.is_enabled() and skipped_in_a_row.item():
            log.print(f"float16: the GradScaler skipped the last {skipped_in_a_row.item()} steps for inf/NaN gradients")
        log.print(NAN_DIAGNOSIS)
        log.close()
        raise UserError(f"loss or gradients became NaN/Inf by step {step}: {kept_checkpoint()}; see the likely causes "
                        f"above (lower learning_rate, set grad_clip, avoid float16)")

    def out_of_memory_advice():
        return f"{memory.smaller_step_advice(cfg)}; {kept_checkpoint()}"

    if master and (cfg.debug_data or cfg.check_init):
        X, Y = step_batches(train_data, iter_num, cfg.batch_size, 1, cfg.block_size, cfg.seed, device,
                            vocab_size=vocab_size)[0]
        if cfg.debug_data:
            check_batch(X, Y, tokenizer_from_meta(dataset.meta).decode, log.print)
        if cfg.check_init:
            Xv, Yv = get_batch(dataset.splits["val"], eval_offsets(cfg.seed, "val", cfg.batch_size, len(dataset.splits["val"]),
                                                                     cfg.block_size), cfg.block_size, device, vocab_size)
            check_init(raw_model, Xv, Yv, dataset.vocab_size or vocab_size, ctx, log.print)
    monitor = GradMonitor(raw_model, cfg.grad_monitor_interval) if cfg.grad_monitor_interval and master else None
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # set by any step whose loss or gradient is NaN/Inf
    skipped_in_a_row = torch.zeros((), dtype=torch.long, device=device)  # float16 steps the GradScaler skipped

    if saved_rng is not None:
        # the last thing before the loop, so no setup step can draw from the restored state
        set_rng_state(saved_rng[rank], device)  # dropout continues exactly where it stopped
    exit_code = 0
    t_start = time.time()
    t_window, window_iters, running_mfu = time.time(), 0, -1.0
    with StopRequest() as stop, memory.explain_out_of_memory(lambda: f"at step {iter_num}", out_of_memory_advice):
        while True:
            at_eval = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only
            if at_eval and (iter_num != resumed_at or cfg.eval_only):  # a resumed step was evaluated before its save
                t_eval = time.time()
                if nonfinite.item():
                    stop_for_nonfinite(iter_num)
                rng_states = all_rng_states(device, world_size)
                stop_early = False
                if master:
                    losses = estimate_loss(eval_model, dataset, cfg.eval_iters, cfg.batch_size, cfg.block_size, cfg.seed,
                                           device, ctx, vocab_size, doc_sep)
                    log.print(eval_line(iter_num, losses["train"], losses["val"]))
                    log.metrics({"type": "eval", "step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "lr": lr_at(cfg, iter_num), "elapsed_s": time.time() - t_start})
                    if not all(math.isfinite(v) for v in losses.values()):
                        stop_for_nonfinite(iter_num)
                    improved = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])
                    if cfg.early_stop_patience and not cfg.eval_only:
                        if losses["val"] < early["best"] - cfg.early_stop_min_delta:
                            early.update(best=losses["val"], best_step=iter_num, evals_without_improvement=0)
                        else:
                            early["evals_without_improvement"] += 1
                        stop_early = early["evals_without_improvement"] >= cfg.early_stop_patience
                    if not cfg.eval_only and iter_num > 0 and (improved or cfg.always_save_checkpoint
                                                               or iter_num == cfg.max_iters or stop_early):
                        save(iter_num, improved, rng_states)
                if cfg.early_stop_patience and world_size > 1:
                    stop_early = agree_with_master(stop_early, device)
                if stop_early:
                    log.print(f"early stopping at step {iter_num}: val loss has not improved by more than "
                              f"{cfg.early_stop_min_delta} for {cfg.early_stop_patience} evaluations (best "
                              f"{early['best']:.4f} at step {early['best_step']}); the best model is in {out_dir / BEST}")
                    break
                t_window += time.time() - t_eval  # keep evaluation out of the iteration time
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break
            lr = lr_at(cfg, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = step_batches(train_data, iter_num, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.block_size,
                                   cfg.seed, device, rank, world_size, vocab_size, cfg.mask_prob, cfg.mask_token)
            loss = forward_backward(model, batches, ctx, scaler, doc_sep)
            scaler.unscale_(optimizer)  # true gradients for the monitor, the guard and clipping (no-op unless float16)
            grad_record = monitor.gradients(iter_num) if monitor and monitor.due(iter_num) else None
            norm, skipped = optimizer_step(model, optimizer, scaler, cfg.grad_clip)
            finite = torch.isfinite(loss)
            if skipped is not None:  # float16: the scaler skips an inf-gradient step; only a long run of them is fatal
                skipped_in_a_row = (skipped_in_a_row + 1) * skipped
                finite &= skipped_in_a_row < MAX_SKIPPED_STEPS
            elif norm is not None:
                finite &= torch.isfinite(norm)
            nonfinite |= ~finite
            if grad_record is not None:
                grad_record.update(lr=lr, update_ratio=monitor.update_ratio())
                log.metrics(grad_record)
                layers = " ".join(f"{k} {v:.3g}" for k, v in grad_record["layer_norms"].items())
                log.print(f"grad {iter_num}: norm {grad_record['grad_norm']:.4f}, max {grad_record['grad_max']:.4g}, "
                          f"update/param {grad_record['update_ratio']:.2e}; layer norms: {layers}")
                for warning in grad_warnings(grad_record):
                    log.print(f"WARNING: {warning}")
            window_iters += 1
            if iter_num % cfg.log_interval == 0:
                if nonfinite.item():  # every rank checks here, so all of them stop at the same step
                    stop_for_nonfinite(iter_num)
                if master:
                    lossf = loss.item()  # the one host sync per logged step
                    dt = (time.time() - t_window) / window_iters
                    t_window, window_iters = time.time(), 0
                    if iter_num - (resumed_at or 0) >= 5:  # let the first iterations (allocation, compilation) pass
                        mfu = flops_per_iter / dt / peak
                        running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
                    log.print(iter_line(iter_num, lossf, dt * 1000, running_mfu))
                    log.metrics({"type": "train", "iter": iter_num, "loss": lossf, "lr": lr, "time_ms": dt * 1000,
                                 "mfu": running_mfu, "tokens_per_s": tokens_per_iter / dt})
            iter_num += 1
            # DDP ranks must agree on stopping; that costs a collective and a host sync, so only at log steps
            signum = stop.agreed(world_size, device) if world_size == 1 or iter_num % cfg.log_interval == 0 else None
            if signum:
                if nonfinite.item():
                    stop_for_nonfinite(iter_num)
                rng_states = all_rng_states(device, world_size)
                if master:
                    save(iter_num, False, rng_states)
                log.print(f"interrupted ({signal.Signals(signum).name}) after step {iter_num}: saved {out_dir / LATEST}; "
                          f"continue with --init_from=resume")
                exit_code = 128 + signum
                break

    log.print(took_line(time.time() - t_start))
    log.close()
    if world_size > 1:
        dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    run_main(main)
