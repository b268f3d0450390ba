"""How much memory a training run needs, how much the device has, and what to do when it does not fit (the
tutorial's ch01 6.1 decision tree: smaller micro-batch with more accumulation, then a shorter context or a smaller
model; FSDP sharding when the weights themselves are the problem). tools/estimate.py prints these figures; train.py
checks them before building the model and turns an out-of-memory error during training into the same advice."""
import contextlib
import dataclasses
import os
import re

import torch

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import ConfigError, UserError
from gpt_toolkit.models import lora

UNITS = {"": 1, "B": 1, "KB": 2**10, "K": 2**10, "MB": 2**20, "M": 2**20, "GB": 2**30, "G": 2**30, "TB": 2**40}
CPU_RUNTIME_BYTES = 85 * 2**20  # kernels' workspaces and buffers a CPU training step allocates (measured, torch 2.13)
MATH_ATTENTION_BYTES = 17  # per B*h*T*T element: on CPU, attention with dropout materializes T x T scores (measured)
# The estimate is calibrated to within ~25% of measured peaks: a run is refused only when even 0.8x of it exceeds
# what the device has, so a run that might fit always starts.
MIGHT_FIT = 0.8


def parse_size(text):
    """'8GB', '512MB', '24G' -> bytes."""
    number = text.rstrip("BKMGTbkmgt").strip()
    unit = text[len(number):].strip().upper()
    try:
        return float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"memory size '{text}': write it like 8GB, 512MB or 24G") from None


def fmt_bytes(n):
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def param_count(*, n_layer, n_embd, block_size, vocab_size, bias, n_head=1, options=None):
    """Exact parameter count of model.GPT (sum of p.numel(), the tied embedding once), without building it; options:
    the model options it turns on (model.MODEL_OPTIONS keys)."""
    options = options or {}
    d = n_embd
    norm = d if options.get("rmsnorm") or not bias else 2 * d  # a gain, and LayerNorm's bias when there are biases
    per_block = 12 * d * d + (9 * d if bias else 0) + 2 * norm  # attention 4d^2, MLP 8d^2; their biases; two norms
    if options.get("qk_norm"):
        per_block += 2 * (d // n_head)  # the query and key norms' gains
    positions = 0 if options.get("rotary") else block_size * d
    tables = 1 + bool(options.get("untied_head")) + (n_layer if options.get("value_embeddings") else 0)
    return tables * vocab_size * d + positions + n_layer * per_block + norm


def block_activation_bytes(cfg, tokens, dtype):
    """What autograd keeps for one transformer block, counted from this model's code. Per token: the two
    LayerNorm inputs (2d, float32 even under autocast), attention input d, q/k/v 3d, attention output d and its
    re-laid-out copy d, MLP input d, GELU input 4d and output 4d (15d more, in the compute dtype), plus 1-byte
    masks for the two dropouts when dropout > 0."""
    width = 4 if dtype == "float32" else 2
    per_token = 2 * cfg.n_embd * 4 + 15 * cfg.n_embd * width + (2 * cfg.n_embd if cfg.dropout > 0 else 0)
    return tokens * per_token


def memory_estimate(cfg, *, n_params, vocab_size, dtype, batch_size=None, device_type="cpu", block_size=None):
    """Bytes by kind for one training step at micro-batch batch_size (default cfg's) and context block_size
    (default cfg's). float32 weights, gradients and AdamW's two moments take 16 bytes per parameter; autocast adds
    a cached half-precision copy of the weights."""
    batch_size = batch_size or cfg.batch_size
    block_size = block_size or cfg.block_size
    tokens = batch_size * block_size
    block = block_activation_bytes(cfg, tokens, dtype)
    checkpointing = cfg.activation_checkpointing
    trained = n_params  # LoRA: only the adapters have gradients and optimizer state
    if cfg.lora_rank:
        trained = lora.param_count(n_layer=cfg.n_layer, n_embd=cfg.n_embd, rank=cfg.lora_rank,
                                   targets=lora.parse_targets(cfg.lora_targets))
    parts = {"parameters": 4 * n_params, "gradients": 4 * trained, "AdamW state": 8 * trained}
    if dtype != "float32":
        parts["autocast weight copies"] = 2 * n_params
    # around the blocks: embedding sum, final LayerNorm input and output, and the logits, their log-softmax
    # and its gradient, which are float32
    outside = tokens * (3 * cfg.n_embd * 4 + 3 * vocab_size * 4)
    # with activation checkpointing each block keeps only its float32 input; one block's activations are rebuilt
    # at a time in the backward pass
    parts["activations"] = (cfg.n_layer * tokens * cfg.n_embd * 4 + block if checkpointing else cfg.n_layer * block) + outside
    held_layers = 1 if checkpointing else cfg.n_layer
    if cfg.dropout > 0 and device_type != "cuda":  # CUDA's flash attention does dropout without T x T matrices
        parts["attention matrices"] = held_layers * batch_size * cfg.n_head * block_size ** 2 * MATH_ATTENTION_BYTES
    parts["backward working memory"] = block  # gradients in flight: about one block's activations
    if device_type != "cuda":
        parts["runtime buffers"] = CPU_RUNTIME_BYTES
    parts["total"] = sum(parts.values())
    return parts


def best_split(cfg, *, n_params, vocab_size, dtype, budget, device_type):
    """The largest micro-batch whose estimate fits the budget, keeping batch_size * accumulation; or None."""
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    for b in range(effective, 0, -1):
        if effective % b == 0 and memory_estimate(cfg, n_params=n_params, vocab_size=vocab_size, dtype=dtype, batch_size=b,
                                                  device_type=device_type)["total"] <= budget:
            return b, effective // b
    return None


def available_memory(device):
    """(bytes this run can still allocate on device, what that figure is), or (None, reason) where it cannot
    be known. CPU: the system's available RAM (system.available_memory); CUDA: the free device memory; MPS:
    Metal's recommended working set, or the system's available RAM when lower (unified memory)."""
    kind = torch.device(device).type
    if kind == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, f"free memory on {torch.cuda.get_device_name(torch.device(device))}"
    system_free, what = system.available_memory()
    if kind == "mps":  # unified memory: the GPU's working set is the system's RAM too
        metal = torch.mps.recommended_max_memory()
        if system_free is not None and system_free < metal:
            return system_free, f"{what}, shared with the GPU (less than Metal's recommended working set)"
        return metal, "Metal's recommended working set"
    return system_free, what


def fit_advice(cfg, *, n_params, vocab_size, dtype, budget, device_type):
    """The next step for a run that does not fit `budget` bytes: activation checkpointing when that alone makes it
    fit; then the tutorial's: a batch_size x accumulation with the same effective batch; else, when the weights,
    gradients and AdamW state take half the budget or more, sharding them with FSDP (or a smaller model); else the
    longest context that fits at batch_size=1."""
    sizes = dict(n_params=n_params, vocab_size=vocab_size, dtype=dtype, device_type=device_type)
    if not cfg.activation_checkpointing:
        need = memory_estimate(with_checkpointing(cfg), **sizes)["total"]
        if need <= budget:
            return (f"use --activation_checkpointing=True (each block recomputed in the backward pass, the same "
                    f"batch; about 1.3x the step time), which the estimate puts at {fmt_bytes(need)}")
    split = best_split(cfg, budget=budget, **sizes)
    if split:
        b, accum = split
        return (f"use --batch_size={b} --gradient_accumulation_steps={accum} (the same effective batch of "
                f"{cfg.batch_size * cfg.gradient_accumulation_steps}), which the estimate puts at "
                f"{fmt_bytes(memory_estimate(cfg, batch_size=b, **sizes)['total'])}")
    weights = memory_estimate(cfg, batch_size=1, block_size=1, **sizes)
    held = weights["parameters"] + weights["gradients"] + weights["AdamW state"]
    if held >= budget / 2:  # the weights themselves are the problem: only sharding them (or a smaller model) helps
        return (f"the model's weights, gradients and AdamW state alone need {fmt_bytes(held)}: shard them over several "
                f"GPUs with torchrun and --parallel=fsdp, or use a smaller model (fewer --n_layer, a smaller --n_embd)")
    block_size = cfg.block_size // 2
    while block_size >= 8:
        need = memory_estimate(cfg, batch_size=1, block_size=block_size, **sizes)["total"]
        if need <= budget:
            return (f"even batch_size=1 does not fit at block_size={cfg.block_size}: use --batch_size=1 "
                    f"--block_size={block_size} (estimate {fmt_bytes(need)}), or a smaller model")
        block_size //= 2
    need = memory_estimate(cfg, batch_size=1, block_size=8, **sizes)["total"]
    return (f"even batch_size=1 at block_size=8 needs about {fmt_bytes(need)}, of which the weights, gradients and AdamW "
            f"state are only {fmt_bytes(held)} (the rest: activations of the {vocab_size:,}-token output, and the "
            f"runtime's buffers): use a device with more memory, or a smaller model")


def with_checkpointing(cfg):
    return dataclasses.replace(cfg, activation_checkpointing=True)


def smaller_step_advice(cfg):
    """The next step after a run ran out of memory: activation checkpointing when it is off; else the tutorial's half
    the micro-batch with twice the accumulation (the same effective batch), else half the context, else a smaller
    model."""
    step = _smaller_step(cfg)
    if not cfg.activation_checkpointing:
        return f"use --activation_checkpointing=True (the same batch, less memory), or {step.removeprefix('use ')}"
    return step


def _smaller_step(cfg):
    if cfg.batch_size > 1:
        b = max(d for d in range(1, cfg.batch_size // 2 + 1) if cfg.batch_size % d == 0)
        accum = cfg.gradient_accumulation_steps * cfg.batch_size // b
        return (f"use --batch_size={b} --gradient_accumulation_steps={accum} (the same effective batch of "
                f"{cfg.batch_size * cfg.gradient_accumulation_steps})")
    if cfg.block_size > 8:
        return f"batch_size is 1 already: use --block_size={cfg.block_size // 2}, or a smaller model"
    return "use a smaller model (fewer --n_layer, a smaller --n_embd)"


def check_rows(cfg, available):
    """Refuse settings whose token rows alone cannot be held: a step draws batch_size x gradient_accumulation_steps
    rows at once (int64 inputs and targets), an evaluation plans eval_iters x batch_size rows per split."""
    if available is None:
        return
    rows = cfg.batch_size * cfg.gradient_accumulation_steps
    need = rows * (cfg.block_size + 1) * 8 * 2
    if need > available / 2:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} x batch_size={cfg.batch_size} = "
                        f"{rows:,} rows per optimizer step: their token ids alone need {fmt_bytes(need)}, more than "
                        f"this machine can hold ({fmt_bytes(available)} available): use a smaller "
                        f"--gradient_accumulation_steps")
    need = cfg.eval_iters * cfg.batch_size * 8
    if need > available / 2:
        raise UserError(f"eval_iters={cfg.eval_iters} x batch_size={cfg.batch_size} evaluation rows per split: their "
                        f"positions alone need {fmt_bytes(need)}, more than this machine can hold "
                        f"({fmt_bytes(available)} available): use a smaller --eval_iters (the tutorial's 200 on a GPU, "
                        f"20 on a CPU)")


def check_fits(cfg, *, n_params, vocab_size, dtype, device, processes=1):
    """Refuse, before any work, a run whose estimate cannot fit the device (a UserError with the estimate, the
    limit and the fix); return the (estimate, available) bytes otherwise. `processes` sharing the device's memory
    (DDP ranks on one CPU) each need the estimate."""
    kind = torch.device(device).type
    sizes = dict(n_params=n_params, vocab_size=vocab_size, dtype=dtype, device_type=kind)
    check_rows(cfg, available_memory("cpu")[0])  # the rows are drawn in host memory, whatever the device
    need = memory_estimate(cfg, **sizes)["total"] * processes
    have, what = available_memory(device)
    if have is None or MIGHT_FIT * need <= have:
        return need, have
    shared = f" ({processes} processes)" if processes > 1 else ""
    advice = fit_advice(cfg, budget=have / processes, **sizes)
    raise UserError(f"this run needs about {fmt_bytes(need)}{shared} but {device} has {fmt_bytes(have)} ({what}): "
                    f"{advice}; or --check_memory=False to try anyway")


_CPU_ALLOC_RE = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_ALLOC_RE = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


def out_of_memory_request(exc):
    """For an out-of-memory error (torch.OutOfMemoryError on CUDA/MPS, the CPU allocator's RuntimeError, Python's
    MemoryError): what it asked for, as text ('' where the message does not say). None for any other exception."""
    text = str(exc)
    if isinstance(exc, MemoryError):  # numpy's and Python's own allocations
        return ""
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and (
            "can't allocate memory" in text or "out of memory" in text.lower())):
        if m := _CPU_ALLOC_RE.search(text):
            return fmt_bytes(int(m.group(1)))
        if m := _CUDA_ALLOC_RE.search(text):
            return m.group(1).replace("iB", "B")
        return ""
    return None


@contextlib.contextmanager
def explain_out_of_memory(where, advice):
    """Inside the block, an out-of-memory error becomes a UserError: 'out of memory {where()} (asked for X):
    {advice()}'. Both are called only then, so they describe the moment it happened."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        asked = out_of_memory_request(e)
        if asked is None:
            raise
        raise UserError(f"out of memory {where()}{f' (asked for {asked} more)' if asked else ''}: {advice()}") from None


def processes_on_this_machine():
    """How many training processes share this machine's memory (torchrun's LOCAL_WORLD_SIZE; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
