"""Estimate a config before running it (tutorial ch01 5.2, done exactly): parameters, tokens, memory, time, and
for a memory budget the batch_size x gradient_accumulation_steps that keeps the effective batch.

    python tools/estimate.py config/train_shakespeare_char.py [--key=value ...] [--gpu_mem=8GB] [--measure=True]

--measure=True runs a few training steps on the configured device to measure the peak memory and the time per
iteration (needs the dataset prepared); without it everything comes from formulas.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import hardware  # noqa: E402
from configurator import pop_options  # noqa: E402
from errors import ConfigError, UserError, run_main  # noqa: E402
from model import GPT, GPT2_PADDED_VOCAB, GPTConfig  # noqa: E402
from train import Dataset, load_config, scratch_model_args, step_batches, train_step, validate  # noqa: E402

OPTIONS = {"--gpu_mem": (str, ""), "--mem": (str, ""), "--measure": (bool, False), "--measure_steps": (int, 3)}
UNITS = {"": 1, "B": 1, "KB": 2**10, "K": 2**10, "MB": 2**20, "M": 2**20, "GB": 2**30, "G": 2**30, "TB": 2**40}


def parse_size(text):
    number = text.rstrip("BKMGTbkmgt").strip()
    unit = text[len(number):].strip().upper()
    try:
        return float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"memory size '{text}': write it like 8GB, 512MB or 24G") from None


def fmt_bytes(n):
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


CPU_RUNTIME_BYTES = 85 * 2**20  # kernels' workspaces and buffers a CPU training step allocates (measured, torch 2.13)
MATH_ATTENTION_BYTES = 17  # per B*h*T*T element: on CPU, attention with dropout materializes T x T scores (measured)


def block_activation_bytes(cfg, tokens, dtype):
    """What autograd keeps for one transformer block, counted from this model's code. Per token: the two
    LayerNorm inputs (2d, float32 even under autocast), attention input d, q/k/v 3d, attention output d and its
    re-laid-out copy d, MLP input d, GELU input 4d and output 4d (15d more, in the compute dtype), plus 1-byte
    masks for the two dropouts when dropout > 0."""
    width = 4 if dtype == "float32" else 2
    per_token = 2 * cfg.n_embd * 4 + 15 * cfg.n_embd * width + (2 * cfg.n_embd if cfg.dropout > 0 else 0)
    return tokens * per_token


def memory_estimate(cfg, n_params, vocab_size, dtype, batch_size=None, device_type="cpu"):
    """Bytes by kind for one training step at micro-batch batch_size. float32 weights, gradients and AdamW's
    two moments take 16 bytes per parameter; autocast adds a cached half-precision copy of the weights."""
    tokens = (batch_size or cfg.batch_size) * cfg.block_size
    block = block_activation_bytes(cfg, tokens, dtype)
    parts = {"parameters": 4 * n_params, "gradients": 4 * n_params, "AdamW state": 8 * n_params}
    if dtype != "float32":
        parts["autocast weight copies"] = 2 * n_params
    # around the blocks: embedding sum, final LayerNorm input and output, and the logits, their log-softmax
    # and its gradient, which are float32
    parts["activations"] = cfg.n_layer * block + tokens * (3 * cfg.n_embd * 4 + 3 * vocab_size * 4)
    if cfg.dropout > 0 and device_type != "cuda":  # CUDA's flash attention does dropout without T x T matrices
        parts["attention matrices"] = (cfg.n_layer * (batch_size or cfg.batch_size) * cfg.n_head * cfg.block_size ** 2
                                       * MATH_ATTENTION_BYTES)
    parts["backward working memory"] = block  # gradients in flight: about one block's activations
    if device_type != "cuda":
        parts["runtime buffers"] = CPU_RUNTIME_BYTES
    parts["total"] = sum(parts.values())
    return parts


def measure(cfg, vocab_size, steps, device, dtype):
    """(peak bytes a training step adds, ms per iteration) from a few real steps; memory as CUDA's allocator
    peak on GPU, the process's peak RSS on CPU."""
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    dataset.check_block_size(cfg.block_size)
    kind = hardware.device_type(device)
    base = hardware.memory_in_use(device)
    hardware.reset_peak_memory(device)  # after reading base: the peak can then never be below it
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**scratch_model_args(cfg, vocab_size))).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), kind)
    ctx, scaler = hardware.autocast(device, dtype), hardware.grad_scaler(device, dtype)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batches = step_batches(dataset.splits["train"], step, cfg.batch_size, cfg.gradient_accumulation_steps,
                               cfg.block_size, cfg.seed, device, vocab_size=vocab_size)
        train_step(model, optimizer, scaler, batches, ctx, cfg.grad_clip).item()
        hardware.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = hardware.peak_memory(device) - base
    steady = times[1:] or times  # the first step pays for allocation
    return peak, 1000 * sum(steady) / len(steady)


def best_split(cfg, n_params, vocab_size, dtype, budget, device_type):
    """The largest micro-batch whose estimate fits the budget, keeping batch_size * accumulation; or None."""
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    for b in range(effective, 0, -1):
        if effective % b == 0 and memory_estimate(cfg, n_params, vocab_size, dtype, b, device_type)["total"] <= budget:
            return b, effective // b
    return None


def main(argv):
    opts, rest = pop_options(argv, OPTIONS)
    cfg, _ = load_config(rest)
    validate(cfg)
    device = hardware.resolve_device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    meta_vocab = None
    try:
        meta_vocab = Dataset(cfg.data_dir, cfg.dataset).vocab_size
    except UserError:
        pass  # the formulas need no data; the vocabulary then is GPT-2's
    vocab_size = meta_vocab or GPT2_PADDED_VOCAB
    L, d, V, T = cfg.n_layer, cfg.n_embd, vocab_size, cfg.block_size
    model = GPT(GPTConfig(**scratch_model_args(cfg, V)))
    exact = sum(p.numel() for p in model.parameters())
    vocab_note = "" if meta_vocab else " (dataset not prepared: GPT-2's)"
    print(f"model: {L} layers x {cfg.n_head} heads x {d} wide, block {T}, vocab {V}{vocab_note}")
    print(f"parameters (exact, sum of p.numel()): {exact:,}  ({exact / 1e6:.2f}M; {model.get_num_params():,} without "
          f"the position embedding, as nanoGPT reports)")
    for label, value, note in (
            ("12 * L * d^2", 12 * L * d * d, "counts the attention (4d^2) and MLP (8d^2) weights only: leaves out "
                                             "the embeddings (V*d + T*d), LayerNorms and biases"),
            ("16 * L * d^2 + V * d", 16 * L * d * d + V * d, "puts 12d^2 in the MLP, which has 8d^2, so it "
                                                             "overcounts by 4*L*d^2 and leaves out T*d")):
        print(f"  tutorial's {label} = {value:,} ({(value - exact) / exact:+.1%} vs exact): {note}")
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    tokens = effective * T
    print(f"tokens per iteration: {cfg.batch_size} x {T} x {cfg.gradient_accumulation_steps} = {tokens:,}; "
          f"over {cfg.max_iters:,} iterations: {tokens * cfg.max_iters:,}")
    kind = hardware.device_type(device)
    parts = memory_estimate(cfg, exact, V, dtype, device_type=kind)
    print(f"memory estimate ({kind}, {dtype}, micro-batch {cfg.batch_size}):")
    for name, value in parts.items():
        print(f"  {name:<24} {fmt_bytes(value)}")
    if opts["measure"]:
        peak, ms = measure(cfg, V, max(2, opts["measure_steps"]), device, dtype)
        print(f"measured on {device}: peak {fmt_bytes(peak)} ({(peak - parts['total']) / parts['total']:+.1%} vs the "
              f"estimate), {ms:.1f} ms per iteration")
        evals = cfg.max_iters // cfg.eval_interval + 1
        eval_s = evals * 2 * cfg.eval_iters * (ms / 1000) / cfg.gradient_accumulation_steps / 3  # a forward ~ 1/3 of a step
        print(f"time estimate: {cfg.max_iters:,} x {ms:.1f} ms = {cfg.max_iters * ms / 1000 / 60:.1f} min of training "
              f"+ ~{eval_s / 60:.1f} min for {evals} evaluations")
    budget_text = opts["gpu_mem"] or opts["mem"]
    if budget_text:
        budget = parse_size(budget_text)
        split = best_split(cfg, exact, V, dtype, budget, kind)
        print(f"for {fmt_bytes(budget)}:")
        if split and split[0] == cfg.batch_size:
            print(f"  batch_size={cfg.batch_size} gradient_accumulation_steps={cfg.gradient_accumulation_steps} fits as is")
        elif split:
            b, accum = split
            estimate = memory_estimate(cfg, exact, V, dtype, b, kind)["total"]
            print(f"  use --batch_size={b} --gradient_accumulation_steps={accum} (effective batch {effective} kept; "
                  f"estimate {fmt_bytes(estimate)})")
        else:
            one = memory_estimate(cfg, exact, V, dtype, 1, kind)["total"]
            print(f"  even batch_size=1 needs {fmt_bytes(one)}: following the tutorial's decision tree, next try "
                  f"--block_size={T // 2}, a smaller model, or --dtype=bfloat16")
    return 0


if __name__ == "__main__":
    run_main(main)
