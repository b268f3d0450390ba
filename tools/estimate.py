"""Estimate a config before running it (tutorial ch01 5.2, done exactly): parameters, tokens, memory, time, and
for a memory budget the batch_size x gradient_accumulation_steps that keeps the effective batch.

    python tools/estimate.py config/train_shakespeare_char.py [--key=value ...] [--mem=8GB] [--measure]

--measure=True runs a few training steps on the configured device to measure the peak memory and the time per
iteration (needs the dataset prepared); without it everything comes from formulas.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback


from gpt_toolkit.core import hardware
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.data.dataset import Dataset
from gpt_toolkit.models.memory import fit_advice, fmt_bytes, memory_estimate, parse_size, with_checkpointing
from gpt_toolkit.training.evaluation import eval_to_step_ratio
from gpt_toolkit.training.init_from import scratch_model_args
from gpt_toolkit.training.timing import train_in_process
from model import GPT, GPT2_PADDED_VOCAB, GPTConfig, model_options
from train import main as train_main  # the entry point: its loop, clocked


def parser():
    p = tool_parser(__file__, __doc__, training_config=True)
    p.add_argument("--mem", "--gpu_mem", dest="mem", default="", help="a memory budget (e.g. 8GB): the micro-batch and "
                   "accumulation that fit it with the same effective batch")
    p.add_flag("--measure", help="run a few training steps to measure peak memory and time per iteration")
    p.add_argument("--measure_steps", type=int, default=3, help="--measure: steps to run (default 3)")
    return p


def measure(cfg, steps):
    """(peak bytes a training run adds, ms per iteration) from a few real steps of train.py; memory as CUDA's
    allocator peak on GPU, the process's peak RSS on CPU."""
    clock = train_in_process(train_main, cfg, steps=steps, memory="whole_run")
    steady = clock.seconds[1:] or clock.seconds  # the first step pays for allocation
    return clock.peak, 1000 * sum(steady) / len(steady)


def main(argv):
    args, cfg = parser().parse(argv)
    device = hardware.resolve_device(cfg.device)
    setup_process(device, keep_cpu_memory=cfg.keep_cpu_memory)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    meta_vocab = None
    try:
        meta_vocab = Dataset(cfg.data_dir, cfg.dataset).vocab_size
    except UserError:
        pass  # the formulas need no data; the vocabulary then is GPT-2's (padded)
    vocab_size = meta_vocab or GPT2_PADDED_VOCAB
    L, d, V, T = cfg.n_layer, cfg.n_embd, vocab_size, cfg.block_size
    model = GPT(GPTConfig(**scratch_model_args(cfg, V)))
    exact = sum(p.numel() for p in model.parameters())
    vocab_note = "" if meta_vocab else " (dataset not prepared: GPT-2's)"
    print(f"model: {L} layers x {cfg.n_head} heads x {d} wide, block {T}, vocab {V}{vocab_note}")
    if model_options(model.config):
        print(f"model options: {', '.join(f'{k}={v}' for k, v in model_options(model.config).items())} (not GPT-2's "
              f"architecture: the tutorial's formulas below count GPT-2's)")
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
    sizes = dict(n_params=exact, vocab_size=V, dtype=dtype, device_type=kind)
    parts = memory_estimate(cfg, **sizes)
    print(f"memory estimate ({kind}, {dtype}, micro-batch {cfg.batch_size}):")
    for name, value in parts.items():
        print(f"  {name:<24} {fmt_bytes(value)}")
    if not cfg.activation_checkpointing:
        checkpointed = memory_estimate(with_checkpointing(cfg), **sizes)["total"]
        print(f"  with --activation_checkpointing=True: total {fmt_bytes(checkpointed)}")
    if args.measure:
        peak, ms = measure(cfg, max(2, args.measure_steps))
        print(f"measured on {device}: peak {fmt_bytes(peak)} ({(peak - parts['total']) / parts['total']:+.1%} vs the "
              f"estimate), {ms:.1f} ms per iteration")
        evals = cfg.max_iters // cfg.eval_interval + 1
        eval_s = evals * eval_to_step_ratio(cfg) * ms / 1000
        print(f"time estimate: {cfg.max_iters:,} x {ms:.1f} ms = {cfg.max_iters * ms / 1000 / 60:.1f} min of training "
              f"+ ~{eval_s / 60:.1f} min for {evals} evaluations")
    if args.mem:
        budget = parse_size(args.mem)
        print(f"for {fmt_bytes(budget)}:")
        if parts["total"] <= budget:
            print(f"  batch_size={cfg.batch_size} gradient_accumulation_steps={cfg.gradient_accumulation_steps} fits as is")
        else:
            print(f"  {fit_advice(cfg, budget=budget, **sizes)}")
    return 0


if __name__ == "__main__":
    run_main(main)
