"""Benchmarks: training speed of a config, with every speed feature on and off; sampling speed with and without
the KV cache. Figures for README come from here.

    python tools/bench.py config/train_shakespeare_char_cpu.py [--key=value ...] [--iters=20] [--rounds=3] [--compare]
    python tools/bench.py --profile config/train_shakespeare_char_fast.py [--iters=20]
    python tools/bench.py --sample config/train_shakespeare_char.py [--max_new_tokens=500] [--num_samples=1]
    python tools/bench.py --batching config/train_shakespeare.py --dataset=DOCS [--key=value ...]
    python tools/bench.py --checkpointing config/train_shakespeare_char.py --block_size=1024 --n_layer=6 --batch_size=4
    python tools/bench.py --allocator config/train_shakespeare_char.py --device=cpu [--iters=5] [--rounds=3]

Training: train.py's own steps (gpt_toolkit.training.timing: each round a fresh train.py run in this process, --warmup steps
untimed, then --iters timed), ms per iteration (median over rounds), tokens/s, MFU against the peak of the device for
that dtype (a spec table for known GPUs, else a measured matmul), and peak memory (CUDA allocator peak, or the
process's peak resident set on CPU). --compare also runs the same config with every speed feature off (float32,
eager, plain AdamW, torch's own attention everywhere), alternates rounds between the two, and prints the ratio.
Sampling times the KV cache on and off, all sampling features off (float32, no cache, torch's attention: what
nanoGPT's sample.py does on CPU), and, when the dtype is not float32, the cache in float32 (its gain against all
off); it uses random weights: speed does not depend on them.
--batching times the two ways of batching a dataset of documents (separated by an end-of-text token): packed rows
of block_size (--packing=True) and whole documents padded to each batch's longest (--padding=True), counting only
real tokens (targets that are not padding) in tokens/s. --checkpointing times the config with and without
--activation_checkpointing (ms per iteration, alternated; peak memory each in a fresh process). --allocator times
the config on CPU with keep_cpu_memory on and off, each round a fresh process per setting, with page faults per
iteration. --profile runs --iters steps under torch.profiler after the warm-up and prints where a step's time goes:
each op's own time by what it does (matmuls, attention, casts, GELU, norms, ...) and by phase (forward, backward,
the optimizer's step), and what no op accounts for (Python, the loop); a step compiled on a CPU also lists its
largest fused kernels by the ops each fuses.
"""
import argparse
import contextlib
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit.core import hardware, system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import ConfigError, UserError, run_main
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.data.dataset import BatchPlan, Dataset
from gpt_toolkit.training.init_from import scratch_model_args
from gpt_toolkit.training.profiling import ProfiledClock, format_split, name_compiled_kernels
from gpt_toolkit.training.timing import StepClock, train_in_process
from model import GPT, GPT2_PADDED_VOCAB, GPTConfig
from train import main as train_main  # the entry point: its loop, with our clock among its guards

MODES = ("sample", "batching", "allocator", "profile", "checkpointing", "compare")  # the benchmarks besides the default


def parser():
    p = tool_parser(__file__, __doc__, training_config=True)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per round (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating the variants (default 3)")
    p.add_flag("--compare", help="also time every speed feature off, and print the ratio")
    p.add_flag("--checkpointing", help="time the config with and without activation checkpointing")
    p.add_flag("--batching", help="time packed rows against padded documents")
    p.add_flag("--allocator", help="time keep_cpu_memory on and off, each in fresh processes (CPU)")
    p.add_flag("--sample", help="time sampling instead of training")
    p.add_flag("--profile", help="where a training step's time goes, by op kind and phase (torch.profiler)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="--sample: tokens per sample (default 500)")
    p.add_argument("--num_samples", type=int, default=1, help="--sample: samples per batch (default 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="--sample: temperature (default 0.8)")
    p.add_argument("--top_k", type=int, default=200, help="--sample: top_k (default 200)")
    # internal: what a fresh child process of this tool measures
    p.add_argument("--memory_of", default="", help=argparse.SUPPRESS)
    p.add_argument("--steps_of", default="", help=argparse.SUPPRESS)
    return p


class Variant:
    """One way of running the config's training step (a Config for train.py), timed in rounds: each round a fresh
    train.py run in this process, `warmup` steps and then the timed ones."""

    def __init__(self, name, cfg, dataset):
        self.name, self.cfg, self.dataset = name, cfg, dataset
        self.device = hardware.resolve_device(cfg.device)
        self.kind = hardware.device_type(self.device)
        self.dtype = hardware.resolve_dtype(cfg.dtype, self.device)
        use_compile = hardware.resolve_compile(cfg.compile, self.device)
        self.features = (f"{self.dtype}, {'compiled' if use_compile else 'eager'}, "
                         f"{'fused' if cfg.fused_adamw else 'plain'} AdamW, "
                         f"{'fast CPU' if cfg.fast_cpu_attention and self.kind == 'cpu' else 'torch'} attention")
        self.flops_per_iter = None
        self.times, self.rates = [], []

    def steps(self, n, warmup):
        """One round: a fresh run, warmup steps, then n timed; returns seconds per step (and adds the real tokens
        per second, padding left out, to self.rates)."""
        clock = train_in_process(train_main, self.cfg, steps=warmup + n)
        self.flops_per_iter = clock.flops_per_iter
        seconds = sum(clock.seconds[warmup:])
        real = sum(int((Y >= 0).sum()) for step in range(warmup, warmup + n)
                   for _, Y in BatchPlan.of(self.cfg).step(self.dataset, "train", step, padding=self.cfg.padding))
        self.rates.append(real / seconds)
        return seconds / n

    def peak_memory(self):
        """Peak memory two training steps add to what the process holds (model, data) before them."""
        return train_in_process(train_main, self.cfg, steps=2, memory="steps").peak


def variant(which, cfg, dataset):
    if which == "checkpointed":  # every speed feature on, and the blocks recomputed in the backward pass
        v = Variant("checkpointed", dataclasses.replace(cfg, activation_checkpointing=True), dataset)
        v.features += ", activation checkpointing"
        return v
    if which == "on":
        return Variant("all features on", cfg, dataset)
    return Variant("all features off", dataclasses.replace(cfg, dtype="float32", compile=False, fused_adamw=False,
                                                           fast_cpu_attention=False), dataset)


class FaultCounter(StepClock):
    """A StepClock that also counts the process's page faults after each step."""

    def __init__(self):
        super().__init__()
        self.faults = []

    def after_step(self, step, loss, norm, lr):
        self.faults.append(system.minor_page_faults())
        super().after_step(step, loss, norm, lr)


def fresh_process(argv, *names):
    """Run this tool with argv in a new process; the numbers it prints after each of names."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    out = subprocess.run(cmd, capture_output=True, check=True, **system.utf8_pipes()).stdout.split()
    return [float(out[out.index(name) + 1]) for name in names]


def peak_memory_in_fresh_process(which, argv):
    """Each variant's memory in a process of its own: freed memory stays with the process (glibc keeps it), so
    a second variant measured in the same process would reuse the first one's pages and look smaller."""
    return int(fresh_process([*argv, f"--memory_of={which}"], "peak_bytes")[0])


def train_bench(cfg, opts, argv):
    device = hardware.resolve_device(cfg.device)
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    dataset.check_block_size(cfg.block_size)
    if opts["memory_of"]:
        print(f"peak_bytes {variant(opts['memory_of'], cfg, dataset).peak_memory()}")
        return
    if opts["steps_of"]:
        clock = train_in_process(train_main, variant(opts["steps_of"], cfg, dataset).cfg,
                                 steps=opts["warmup"] + opts["iters"], clock=FaultCounter())
        seconds = sum(clock.seconds[opts["warmup"]:]) / opts["iters"]
        faults = (clock.faults[-1] - clock.faults[opts["warmup"] - 1]) / opts["iters"]
        print(f"seconds_per_iter {seconds} faults_per_iter {faults}")
        return
    names = ["on", "checkpointed"] if opts["checkpointing"] else ["on", "off"] if opts["compare"] else ["on"]
    variants = [variant(which, cfg, dataset) for which in names]
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    print(f"{cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size} x "
          f"{cfg.gradient_accumulation_steps}: {tokens:,} tokens per iteration on {device}")
    for _ in range(opts["rounds"]):  # alternate, so a slow patch of the machine hits both alike
        for v in variants:
            v.times.append(v.steps(opts["iters"], opts["warmup"]))  # each after warm-up: allocation, compilation
    rows = []
    memories = []
    for v, which in zip(variants, names):
        ms = 1000 * statistics.median(v.times)
        peak, _ = hardware.peak_flops(device, v.dtype)
        memory = peak_memory_in_fresh_process(which, [a for a in argv if not a.startswith(("--compare", "--checkpointing"))])
        memories.append(memory)
        rows.append((v, ms))
        mfu = v.flops_per_iter / (ms / 1000) / peak
        print(f"{v.name:<17} {ms:9.1f} ms/iter  {tokens / ms * 1000:>10,.0f} tokens/s  MFU {mfu:6.1%}"
              f"  peak memory {memory / 2**20:,.0f} MB  ({v.features})")
        # how far from the limit: the step's FLOPs at the device's measured (or spec) matmul peak
        print(f"{'':<17} matmul floor {1000 * v.flops_per_iter / peak:6.1f} ms/iter ({v.flops_per_iter / 1e9:.2f} GFLOP "
              f"at {peak / 1e9:,.0f} GFLOP/s {v.dtype}): this step takes {ms * peak / 1000 / v.flops_per_iter:.1f}x that")
    if opts["checkpointing"]:
        print(f"activation checkpointing: {memories[1] / memories[0]:.2f}x the peak memory, "
              f"{rows[1][1] / rows[0][1]:.2f}x the time per iteration")
    elif len(rows) == 2:
        print(f"speedup: {rows[1][1] / rows[0][1]:.2f}x faster per iteration with the speed features on")


def profile_bench(cfg, opts):
    """One run of the config: --warmup steps, then --iters under torch.profiler; the step's time split."""
    device = hardware.resolve_device(cfg.device)
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    dataset.check_block_size(cfg.block_size)
    v = variant("on", cfg, dataset)
    print(f"{cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size} x "
          f"{cfg.gradient_accumulation_steps} on {device} ({v.features})")
    compiled_on_cpu = hardware.device_type(device) == "cpu" and hardware.resolve_compile(cfg.compile, device)
    clock = ProfiledClock(opts["warmup"])
    try:  # a compiled step's fused kernels named, else they are one row ("other ops")
        with name_compiled_kernels() if compiled_on_cpu else contextlib.nullcontext():
            train_in_process(train_main, cfg, steps=opts["warmup"] + opts["iters"], clock=clock)
    finally:
        clock.close()
    split = clock.split()
    print(format_split(split, gpu=hardware.device_type(device) == "cuda"))
    peak, _ = hardware.peak_flops(device, v.dtype)
    floor = 1000 * clock.flops_per_iter / peak
    print(f"matmul floor {floor:.1f} ms/iter ({clock.flops_per_iter / 1e9:.2f} GFLOP at {peak / 1e9:,.0f} GFLOP/s "
          f"{v.dtype}): the profiled step takes {split.step_ms / floor:.1f}x that")


def allocator_bench(cfg, opts, argv):
    """keep_cpu_memory on against off, each in fresh processes (glibc's setting holds for a whole process), in
    alternating rounds: ms per iteration and page faults per iteration, medians over the rounds."""
    if hardware.device_type(hardware.resolve_device(cfg.device)) != "cpu":
        raise UserError("--allocator measures glibc's malloc on a CPU run: add --device=cpu")
    base = [a for a in argv if not a.startswith(("--allocator", "--rounds", "--keep_cpu_memory"))]
    seconds, faults = {True: [], False: []}, {True: [], False: []}
    for _ in range(opts["rounds"]):
        for keep in (True, False):
            step, fault = fresh_process([*base, f"--keep_cpu_memory={keep}", "--steps_of=on"], "seconds_per_iter",
                                        "faults_per_iter")
            seconds[keep].append(step)
            faults[keep].append(fault)
    ms = {keep: 1000 * statistics.median(seconds[keep]) for keep in seconds}
    for keep in (True, False):
        print(f"keep_cpu_memory={keep!s:<5} {ms[keep]:9.1f} ms/iter  {statistics.median(faults[keep]):10,.0f} page "
              f"faults per iteration  (medians of {opts['rounds']} fresh processes)")
    print(f"speedup: {ms[False] / ms[True]:.2f}x faster per iteration with keep_cpu_memory")


def batching_bench(cfg, opts):
    """Packed rows against padded documents, same model and settings otherwise, alternating rounds."""
    device = hardware.resolve_device(cfg.device)
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    if dataset.eot_token is None:
        raise UserError(f"--batching needs a dataset of documents separated by an end-of-text token; '{cfg.dataset}' "
                        f"has none: prepare one with data/prepare_text.py --tokenizer=gpt2 (see docs/data.md)")
    dataset.check_block_size(cfg.block_size)
    lengths = dataset.documents("train", cfg.block_size)[1]
    print(f"{cfg.dataset}: {len(lengths):,} train documents (pieces of at most block_size {cfg.block_size}), "
          f"{lengths.mean() - 1:.0f} targets each on average; {cfg.n_layer} layers x {cfg.n_embd}, batch "
          f"{cfg.batch_size} x {cfg.gradient_accumulation_steps}, on {device}")
    variants = [Variant(f"{flag}=True", dataclasses.replace(cfg, packing=flag == "packing", padding=flag == "padding"),
                        dataset) for flag in ("packing", "padding")]
    for _ in range(opts["rounds"]):
        for v in variants:
            v.times.append(v.steps(opts["iters"], opts["warmup"]))
    for v in variants:
        print(f"{v.name:<13} {1000 * statistics.median(v.times):9.1f} ms/iter  "
              f"{statistics.median(v.rates):>10,.0f} real tokens/s  ({v.features})")
    packed, padded = (statistics.median(v.rates) for v in variants)
    print(f"padded documents train on {padded / packed:.2f}x the real tokens per second of packed rows")


def sample_bench(cfg, opts):
    device = hardware.resolve_device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    try:
        vocab_size = Dataset(cfg.data_dir, cfg.dataset).model_vocab_size
    except UserError:  # speed needs no data: a dataset not prepared means GPT-2's vocabulary
        vocab_size = GPT2_PADDED_VOCAB
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**scratch_model_args(cfg, vocab_size))).to(device).eval()
    start = torch.zeros((opts["num_samples"], 1), dtype=torch.long, device=device)
    n = opts["max_new_tokens"]
    print(f"sampling {opts['num_samples']} x {n} tokens from a {cfg.n_layer} x {cfg.n_embd} model (block {cfg.block_size}) "
          f"on {device}, {dtype}")
    # (label, dtype, KV cache, CPU attention detours); the third is nanoGPT's sample.py on CPU: float32, no cache
    variants = [("KV cache on", dtype, True, cfg.fast_cpu_attention), ("KV cache off", dtype, False, cfg.fast_cpu_attention),
                ("all features off", "float32", False, False)]
    if dtype != "float32":  # the cache's gain in float32 too: all off is float32 without it (no dropout: same attention)
        variants.append(("KV cache on", "float32", True, cfg.fast_cpu_attention))
    rates = {v: [] for v in variants}

    def generate(v, n):
        _, v_dtype, kv_cache, fast_attention = v
        model.config.fast_cpu_attention = fast_attention
        with torch.no_grad(), hardware.autocast(device, v_dtype):
            model.generate(start, n, opts["temperature"], opts["top_k"], kv_cache=kv_cache)

    for v in variants:
        generate(v, 8)  # warm-up
    for _ in range(opts["rounds"]):  # alternate, so a slow patch of the machine hits all alike
        for v in variants:
            t0 = time.perf_counter()
            generate(v, n)
            hardware.synchronize(device)
            rates[v].append(opts["num_samples"] * n / (time.perf_counter() - t0))
    medians = [statistics.median(rates[v]) for v in variants]
    for v, rate in zip(variants, medians):
        detours = ", fast CPU attention" if v[3] and hardware.device_type(device) == "cpu" else ""
        print(f"{v[0]:<16}: {rate:8.1f} tokens/s  ({v[1]}{detours})")
    on, off, all_off = medians[:3]
    print(f"speedup: {on / off:.2f}x more tokens/s with the KV cache (median of {opts['rounds']} rounds)")
    if len(medians) == 4:
        print(f"speedup in float32: {medians[3] / all_off:.2f}x more tokens/s with the KV cache")
    print(f"speedup: {on / all_off:.2f}x more tokens/s with every sampling feature on than with all off")


def main(argv):
    args, cfg = parser().parse(argv)
    opts = vars(args)
    if opts["iters"] < 1 or opts["rounds"] < 1 or opts["max_new_tokens"] < 1 or opts["warmup"] < 1:
        raise ConfigError("--iters, --rounds, --warmup and --max_new_tokens must be positive")
    chosen = [m for m in MODES if opts[m]]  # each runs alone: a second would be silently ignored
    if len(chosen) > 1:
        raise ConfigError(f"--{chosen[0]} and --{chosen[1]} are two different benchmarks: run them one at a time")
    if opts["profile"] and any(a.startswith("--rounds") for a in argv):
        raise ConfigError("--profile profiles one run (--warmup steps, then --iters under the profiler): drop --rounds, "
                          "or raise --iters")
    setup_process(hardware.resolve_device(cfg.device), keep_cpu_memory=cfg.keep_cpu_memory)
    if opts["sample"]:
        sample_bench(cfg, opts)
    elif opts["batching"]:
        batching_bench(cfg, opts)
    elif opts["allocator"]:
        allocator_bench(cfg, opts, argv)
    elif opts["profile"]:
        profile_bench(cfg, opts)
    else:
        train_bench(cfg, opts, argv)
    return 0


if __name__ == "__main__":
    run_main(main)
