"""What a run trains and one step of it: the model for init_from (build_model), the model on its device with its
optimizer, autocast context and GradScaler (build_training: train.py, tools/bench.py, tools/estimate.py and
tools/lr_finder.py all train what this builds), the forward-backward over micro-batches, the optimizer step, and the
evaluation of both splits."""
import contextlib
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt_toolkit import hardware, memory, sharding
from gpt_toolkit.checkpoint import ARCHITECTURE, MODEL_ARGS, is_run_dir, model_from_checkpoint, rng_state, set_rng_state
from gpt_toolkit.compiling import compile_failure, compile_or_eager
from gpt_toolkit.compiling import warning as compile_warning
from gpt_toolkit.dataset import Dataset, eval_offsets, get_batch, padded_batch, run_batches
from gpt_toolkit.errors import UserError
from gpt_toolkit.huggingface import hf_dir_model_args, is_hf_dir, load_pretrained, tokenizer_for_hf_dir
from gpt_toolkit.optimizers import muon_with_adamw
from gpt_toolkit.tokenizer import (
    GPT2_VOCAB_SIZE,
    describe,
    same_vocabulary,
    strip_chat,
    tokenizer_from_meta,
    vocabulary_of,
)
from model import GPT, GPT2_PADDED_VOCAB, GPT2_SIZES, GPTConfig

# ----------------------------------------------------------------------------- the model

def scratch_model_args(cfg, vocab_size):
    """GPTConfig fields of a fresh model with cfg's architecture: what init_from=scratch trains."""
    return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size, bias=cfg.bias,
                vocab_size=vocab_size, dropout=cfg.dropout)


def planned_model_args(cfg, dataset, ckpt):
    """The GPTConfig fields build_model will use, known before building it (ckpt: the checkpoint it comes from, when
    resuming or starting from another run)."""
    if cfg.init_from == "scratch":
        return scratch_model_args(cfg, dataset.model_vocab_size)
    if cfg.init_from == "resume":
        return {**ckpt["model_args"], "dropout": cfg.dropout}
    if is_run_dir(cfg.init_from):  # another run's model: grown for a chat dataset's tokens, its context maybe cropped
        args = ckpt["model_args"]
        return {**args, "dropout": cfg.dropout, "vocab_size": max(args["vocab_size"], dataset.vocab_size or 0),
                "block_size": min(cfg.block_size, args["block_size"])}
    if is_hf_dir(cfg.init_from):
        args = hf_dir_model_args(cfg.init_from, cfg.dropout)
        return {**args, "block_size": min(cfg.block_size, args["block_size"])}
    return dict(GPT2_SIZES[cfg.init_from], block_size=min(cfg.block_size, 1024), bias=True, vocab_size=GPT2_VOCAB_SIZE,
                dropout=cfg.dropout)


def check_resume(ckpt, cfg, cli_keys, dataset):
    """A resume continues the run in the checkpoint: refuse flags and data that contradict it, and take its
    architecture (so the log and the saved config tell the truth)."""
    if not isinstance(ckpt.get("optimizer"), dict) or not isinstance(ckpt.get("iter_num"), int):
        raise UserError("the checkpoint has no optimizer state or step (it holds weights only, or was edited): a resume "
                        "continues a run from the latest.pt it saved; to start a new run from these weights, export "
                        "them with tools/export_hf.py and pass --init_from=THAT_DIR")
    args = ckpt["model_args"]
    for key in ARCHITECTURE:
        if key in cli_keys and getattr(cfg, key) != args[key]:
            raise UserError(f"checkpoint has {key}={args[key]} but --{key}={getattr(cfg, key)} was given: drop --{key} "
                            f"to resume this run, or train a new model in another --out_dir")
        setattr(cfg, key, args[key])
    trained_with = ckpt.get("config", {}).get("optimizer", "adamw")
    if "optimizer" in cli_keys and cfg.optimizer != trained_with:
        raise UserError(f"checkpoint was trained with optimizer={trained_with} but --optimizer={cfg.optimizer} was given: "
                        f"drop --optimizer to resume this run, or start a new one in another --out_dir")
    cfg.optimizer = trained_with
    trained_on = ckpt.get("config", {}).get("dataset")
    if trained_on and trained_on != cfg.dataset:
        raise UserError(f"checkpoint was trained on dataset '{trained_on}' but this run uses '{cfg.dataset}': "
                        f"resume with --dataset={trained_on}, or start a new run in another --out_dir")
    if ckpt.get("meta") is not None and dataset.meta is not None and not same_vocabulary(ckpt["meta"], dataset.meta):
        raise UserError(f"the checkpoint's tokenizer ({describe(ckpt['meta'])}) is not dataset '{cfg.dataset}''s "
                        f"({describe(dataset.meta)}): was the data prepared again, or with another tokenizer? resume on "
                        f"the data the model was trained on")


def check_init_tokenizer(cfg, dataset, init_ckpt=None):
    """Fine-tuning weights (gpt2*, a transformers directory, another run's checkpoint init_ckpt) on a dataset needs
    the dataset in their tokenizer (a chat dataset: with the chat tokens added to it): a one-line error naming both
    otherwise (a model would learn ids that mean other text to it)."""
    if cfg.init_from in ("scratch", "resume") or dataset.meta is None:
        return
    if init_ckpt is not None:
        model_vocab = init_ckpt.get("meta")
    else:
        model_vocab = vocabulary_of(tokenizer_for_hf_dir(cfg.init_from)) if is_hf_dir(cfg.init_from) else None
    if dataset.is_chat:
        same = same_vocabulary(strip_chat(model_vocab or {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE}),
                               strip_chat(dataset.vocabulary))
    else:
        same = same_vocabulary(model_vocab, dataset.vocabulary)
    if not same:
        raise UserError(f"init_from={cfg.init_from} has the tokenizer {describe(model_vocab)}, and dataset '{cfg.dataset}' "
                        f"was prepared with {describe(dataset.vocabulary)}: prepare the data with the model's tokenizer "
                        f"(data/prepare_text.py --tokenizer=...), or train a new model on this dataset")


def check_memory(cfg, dataset, ckpt, device, dtype, world_size):
    """Refuse a run that cannot fit before the model is built (building it alone can take minutes or fail)."""
    args = planned_model_args(cfg, dataset, ckpt)
    shape = SimpleNamespace(**{**vars(cfg), **args})
    n_params = memory.param_count(n_layer=args["n_layer"], n_embd=args["n_embd"], block_size=args["block_size"],
                                  vocab_size=args["vocab_size"], bias=args["bias"])
    sharing = memory.processes_on_this_machine() if hardware.device_type(device) == "cpu" else 1
    if cfg.parallel == "fsdp" and world_size > 1:
        n_params = -(-n_params // world_size)  # each process holds its shard of the weights and their state
    memory.check_fits(shape, n_params=n_params, vocab_size=args["vocab_size"], dtype=dtype, device=device,
                      processes=min(sharing, world_size))


def build_model(cfg, dataset, ckpt):
    """(model, model_args, notes to log) for cfg.init_from; ckpt is the loaded checkpoint when resuming."""
    notes = []
    if cfg.init_from == "scratch":
        if dataset.vocab_size is None:
            notes.append(f"no vocabulary file in the dataset: using GPT-2's vocab_size {GPT2_PADDED_VOCAB} "
                         f"({GPT2_VOCAB_SIZE} padded to a multiple of 64)")
        model_args = scratch_model_args(cfg, dataset.model_vocab_size)
        model = GPT(GPTConfig(**model_args))
    elif cfg.init_from == "resume":
        model = model_from_checkpoint(ckpt, cfg.dropout)
        model_args = {k: getattr(model.config, k) for k in MODEL_ARGS}
    elif is_run_dir(cfg.init_from):
        notes.append(f"initializing from the run in {cfg.init_from} (its weights at step {ckpt.get('iter_num', '?')}; a "
                     f"new optimizer and schedule)")
        model = model_from_checkpoint(ckpt, cfg.dropout)
        model_args = {k: getattr(model.config, k) for k in MODEL_ARGS}
    else:
        source = "the Hugging Face model in" if is_hf_dir(cfg.init_from) else "OpenAI GPT-2 weights:"
        notes.append(f"initializing from {source} {cfg.init_from}")
        model = load_pretrained(cfg.init_from, cfg.dropout)
        model_args = {k: getattr(model.config, k) for k in MODEL_ARGS}
    model.config.fast_cpu_attention = cfg.fast_cpu_attention
    if dataset.is_chat and cfg.init_from != "scratch" and dataset.vocab_size > model_args["vocab_size"]:
        grown = dataset.vocab_size - model_args["vocab_size"]
        model.grow_vocabulary(dataset.vocab_size)
        model_args["vocab_size"] = dataset.vocab_size
        notes.append(f"the chat tokens need {grown} more rows than the model's token embedding has: grown to "
                     f"{dataset.vocab_size}, the new rows starting at the mean of the others")
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


# ----------------------------------------------------------------------------- model, optimizer, precision

@dataclass
class Training:
    """What a training step needs: the model (on its device), its optimizer, the autocast context, the GradScaler."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ctx: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler


def build_training(model, cfg, *, device, dtype, fused=None, learning_rate=None, shard=False):
    """Move model to device and build what trains it: AdamW (weight decay on 2-D weights only; fused where the device
    has the kernel unless fused=False or cfg.fused_adamw is off), or with cfg.optimizer=muon Muon for the blocks'
    matrices and that AdamW for the rest; autocast for dtype, a GradScaler for float16, and activation checkpointing
    as cfg says. shard=True shards the model with FSDP first (under torchrun), so the optimizer's state is sharded
    too. Process-wide settings (TF32, the CPU allocator) are the script's to make: process.setup_process."""
    kind = hardware.device_type(device)
    model.config.activation_checkpointing = getattr(cfg, "activation_checkpointing", False)
    model.to(device)
    if shard:
        sharding.shard_model(model)
    fused = cfg.fused_adamw if fused is None else fused
    lr = learning_rate or cfg.learning_rate
    if getattr(cfg, "optimizer", "adamw") == "muon":
        # Newton-Schulz in bfloat16 where the device multiplies it fast (where auto picks it), else in float32
        fast_bf16 = hardware.resolve_dtype("auto", device) == "bfloat16"
        optimizer = muon_with_adamw(model, weight_decay=cfg.weight_decay, learning_rate=lr, betas=(cfg.beta1, cfg.beta2),
                                    fused=None if fused else False, ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    else:
        optimizer = model.configure_optimizers(weight_decay=cfg.weight_decay, learning_rate=lr,
                                               betas=(cfg.beta1, cfg.beta2), device_type=kind,
                                               fused=None if fused else False)
    return Training(model, optimizer, hardware.autocast(device, dtype), hardware.grad_scaler(device, dtype))


# ----------------------------------------------------------------------------- one step, and evaluation

def forward_backward(model, micro_batches, ctx, scaler, doc_sep=None):
    """Accumulate the gradient of the mean loss over micro_batches. Returns that mean loss as a tensor
    (no host sync). Under DDP and FSDP, gradients are reduced across processes only on the last micro-step."""
    n = len(micro_batches)
    total = None
    for i, (X, Y) in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP
            model.set_requires_gradient_sync(i == n - 1)
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
    if grad_clip > 0:  # with FSDP, the norm over every shard
        norm = sharding.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    scale = scaler._scale.clone() if scaler.is_enabled() else None  # the scaler lowers its scale when it skips
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm, (scaler._scale < scale if scale is not None else None)


class TrainingModule:
    """What a training step runs the model through: compiled when asked, wrapped in DDP when several processes
    train it (not under FSDP, which shards the model itself). When torch.compile fails at a step, it says so once
    (report(warning), then on_failure(cause, step)), redoes that step eagerly from the same RNG state (so the dropout
    masks are an eager run's) and stays eager."""

    def __init__(self, raw_model, *, compile, wrap, on_failure, report):
        self.raw_model, self.wrap, self.on_failure, self.report = raw_model, wrap, on_failure, report
        self.compiled = False
        model = raw_model
        if compile:
            report("compiling the model... (takes a minute)")
            model, self.compiled = compile_or_eager(raw_model, report, "training")
        self.module = wrap(model)

    def forward_backward(self, micro_batches, ctx, scaler, doc_sep, step, device, rng_before=None):
        """forward_backward over the micro-batches; a compile failure falls back as the class says (rng_before: this
        process's RNG state at the step's start, when the caller has it already)."""
        if self.compiled and rng_before is None:
            rng_before = rng_state(device)
        try:
            return forward_backward(self.module, micro_batches, ctx, scaler, doc_sep)
        except Exception as e:
            cause = compile_failure(e) if self.compiled else None
            if cause is None:
                raise
        self.report(compile_warning(cause, "training"))
        self.on_failure(cause, step)
        self.compiled, self.module = False, self.wrap(self.raw_model)
        self.module.zero_grad(set_to_none=True)  # whatever the failed attempt accumulated
        set_rng_state(rng_before, device)
        return forward_backward(self.module, micro_batches, ctx, scaler, doc_sep)


def train_step(training, micro_batches, grad_clip, doc_sep=None):
    """One optimizer step for the tools (lr_finder, estimate, bench): forward-backward over the micro-batches,
    unscale, clip, step. Returns the mean loss (a tensor). The training loop spells these out, because the
    gradient monitor looks at the gradients between unscaling and stepping."""
    t = training
    loss = forward_backward(t.model, micro_batches, t.ctx, t.scaler, doc_sep)
    t.scaler.unscale_(t.optimizer)
    optimizer_step(t.model, t.optimizer, t.scaler, grad_clip)
    return loss


def timed_steps(cfg, dataset, *, device, dtype, steps, vocab_size=None):
    """Seconds of each of `steps` training steps of a fresh model with cfg (its batches, optimizer, precision), timed
    to the device's end: what a step costs, for estimates and budgets. The first pays for allocation."""
    vocab_size = vocab_size or dataset.model_vocab_size
    torch.manual_seed(cfg.seed)
    training = build_training(GPT(GPTConfig(**scratch_model_args(cfg, vocab_size))), cfg, device=device, dtype=dtype)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batches = run_batches(cfg, dataset, step, device, vocab_size=vocab_size)
        train_step(training, batches, cfg.grad_clip).item()
        hardware.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def estimate_loss(model, dataset, *, eval_iters, batch_size, block_size, seed, device, ctx, vocab_size=None,
                  doc_sep=None, padding=False, progress=None, byte_lengths=None):
    """Mean loss over eval_iters fixed batches per split ({'train': x, 'val': y}), model in eval mode; with padding,
    batches of whole documents as training draws them. With byte_lengths (bytes per id), also the bits per byte of
    those batches ({'train_bpb': .., 'val_bpb': ..}). progress(split, batches done, eval_iters) after each batch."""
    was_training = model.training
    model.eval()
    out = {}
    lengths = None if byte_lengths is None else byte_lengths.to(device)
    for split, data in dataset.splits.items():
        segments = dataset.documents(split, block_size) if padding else None
        offsets = eval_offsets(seed=seed, split=split, count=eval_iters * batch_size,
                               split_len=len(data) if segments is None else len(segments[0]),
                               block_size=block_size if segments is None else 0)
        total = torch.zeros((), device=device)
        nats, n_bytes = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), device=device)
        for done, rows in enumerate(offsets.reshape(eval_iters, batch_size)):
            if segments is None:
                X, Y = get_batch(data, rows, block_size=block_size, device=device, vocab_size=vocab_size,
                                 trained=dataset.trained[split])
            else:
                X, Y = padded_batch(data, segments[0][rows], segments[1][rows], pad=dataset.eot_token, device=device,
                                    vocab_size=vocab_size, trained=dataset.trained[split])
            with ctx:
                _, loss = model(X, Y, doc_sep)
            total += loss.float()
            if lengths is not None:  # the batch's loss is a mean over its targets (padding's -1 left out)
                targets = Y >= 0
                nats += loss.double() * targets.sum()
                n_bytes += lengths[Y.clamp(min=0)][targets].sum()
            if progress is not None:
                progress(split, done + 1, eval_iters)
        out[split] = total.item() / eval_iters  # one host sync per split
        if lengths is not None:
            out[f"{split}_bpb"] = nats.item() / math.log(2) / max(n_bytes.item(), 1)
    model.train(was_training)
    return out


@dataclass
class Score:
    """A model's loss over a split: the mean loss per token (nats), how many tokens, and the UTF-8 bytes of the text
    they encode (None when the vocabulary is unknown). Bits per byte compares models whose tokens differ."""
    loss: float
    tokens: int
    text_bytes: int | None

    @property
    def bits_per_byte(self):
        return self.loss * self.tokens / math.log(2) / self.text_bytes if self.text_bytes else None


@torch.no_grad()
def score_split(model, data, *, block_size, batch_size, device, ctx, byte_lengths=None, trained=None, progress=None):
    """Score over every token of a split: non-overlapping windows of block_size (the last one shorter), each token
    predicted once from the tokens before it in its window. Reads the split batch by batch (memory stays bounded for
    any size of val.bin); byte_lengths (bytes per id, token_byte_lengths) counts the text's bytes; a chat split's
    trained mask scores only the assistant's tokens; progress(n) is called with the tokens of each batch."""
    was_training = model.training
    model.eval()
    scored = len(data) - 1
    starts = np.arange(0, scored, block_size)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    n_bytes = torch.zeros((), dtype=torch.long, device=device)
    lengths = None if byte_lengths is None else byte_lengths.to(device)
    for length, group in ((block_size, starts[starts + block_size <= scored]), (None, starts[starts + block_size > scored])):
        for i in range(0, len(group), batch_size):
            rows = group[i:i + batch_size]
            T = length or scored - int(rows[0])
            X, Y = get_batch(data, rows, block_size=T, device=device, trained=trained)
            with ctx:
                logits, _ = model(X, Y)
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), Y.reshape(-1), reduction="sum",
                                     ignore_index=-1).double()
            count += int((Y >= 0).sum()) if trained is not None else Y.numel()
            if lengths is not None:
                n_bytes += lengths[Y.clamp(min=0)][Y >= 0].sum()
            if progress:
                progress(Y.numel())
    model.train(was_training)
    return Score(total.item() / count, count, int(n_bytes.item()) if lengths is not None else None)


def score_line(split, score):
    """'val loss 1.7750 (perplexity 5.90) over 111,539 tokens; 2.5608 bits per byte over 111,539 bytes'."""
    perplexity = math.exp(score.loss) if score.loss < 700 else math.inf  # exp overflows a float past ~709
    line = f"{split} loss {score.loss:.4f} (perplexity {perplexity:.2f}) over {score.tokens:,} tokens"
    if score.bits_per_byte is None:
        return line
    return f"{line}; {score.bits_per_byte:.4f} bits per byte over {score.text_bytes:,} bytes"


def token_byte_lengths(meta, vocab_size):
    """A tensor of vocab_size: the UTF-8 bytes of text each id stands for (0 for <|endoftext|> and for the padding
    rows of a model's embedding), from a vocabulary description (None: GPT-2's, nanoGPT's convention). None where the
    tokenizer cannot be loaded (GPT-2's files offline without a cache): bits per byte are then left out."""
    try:
        lengths = tokenizer_from_meta(meta).byte_lengths()
    except UserError:
        return None
    table = torch.zeros(max(vocab_size, len(lengths)), dtype=torch.long)
    table[:len(lengths)] = torch.tensor(lengths, dtype=torch.long)
    return table


def checkpoint_split(ckpt, *, split="val", dataset=None, data_dir=None):
    """A Scoring of a loaded checkpoint (ours or nanoGPT's) on a split of the dataset it was trained on, or of
    `dataset`."""
    config = ckpt.get("config", {})
    name = dataset or config.get("dataset")
    if not name:
        raise UserError("the checkpoint does not say which dataset it was trained on: pass --dataset=NAME")
    data = Dataset(data_dir or config.get("data_dir", "data"), name)
    trained = ckpt.get("meta")
    grow = data.is_chat and same_vocabulary(strip_chat(data.meta), trained)  # a base model on its chat data
    if trained is not None and data.meta is not None and not same_vocabulary(trained, data.meta) and not grow:
        raise UserError(f"the model's vocabulary ({describe(trained)}, from dataset "
                        f"'{config.get('dataset', '?')}') is not dataset '{name}''s ({describe(data.meta)}): "
                        f"score it on data prepared with its tokenizer, e.g. --dataset={config.get('dataset', 'NAME')}")
    model = model_from_checkpoint(ckpt)
    if grow and data.vocab_size > model.config.vocab_size:  # as fine-tuning starts from it: the chat tokens added
        model.grow_vocabulary(data.vocab_size)
    vocab_size = model.config.vocab_size
    data.check_token_ids(vocab_size)
    lengths = token_byte_lengths(data.vocabulary if grow or trained is None else trained, vocab_size)
    return Scoring(model, data.splits[split], data.trained[split], name, lengths)


@dataclass
class Scoring:
    """What score_split needs for a checkpoint: its model (CPU), the split's tokens, which of them are trained (chat
    data) or None, the dataset's name, and the bytes per token id (None when the tokenizer is unknown)."""
    model: torch.nn.Module
    data: np.ndarray
    trained: np.ndarray | None
    name: str
    byte_lengths: torch.Tensor | None

    def score(self, *, block_size=None, batch_size, device, ctx, progress=None):
        return score_split(self.model.to(device), self.data, block_size=block_size or self.model.config.block_size,
                           batch_size=batch_size, device=device, ctx=ctx, byte_lengths=self.byte_lengths,
                           trained=self.trained, progress=progress)
