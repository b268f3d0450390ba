"""LoRA against full fine-tuning at GPT-2 124M's shape: peak memory and time per step of the same batch.

    python tools/bench_lora.py [--dataset=shakespeare] [--batch_size=2] [--block_size=128] [--lora_rank=8]
                               [--steps=3] [--rounds=3] [--key=value ...]

The base is GPT-2 124M's shape with random weights (offline; speed and memory do not depend on the weights), saved as
a run to fine-tune from; the data a GPT-2-tokenized dataset (python data/shakespeare/prepare.py). Each measurement is
train.py itself (gpt_toolkit.training.timing) in a fresh process, so its peak resident set is that run's peak memory (the base's
checkpoint loaded, the model, its optimizer, the steps); one untimed step, then --steps timed (median). The two
variants alternate for --rounds rounds; the ratios are LoRA's over full fine-tuning's medians. Extra --key=value
arguments reach both runs (e.g. --lora_targets=c_attn, --dtype=float32).
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.config import load_config, validate
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.hardware import cpu_name
from gpt_toolkit.data.dataset import Dataset
from gpt_toolkit.models.checkpoint import BEST, save_weights
from gpt_toolkit.training.timing import train_in_process
from model import GPT, GPT2_PADDED_VOCAB, GPTConfig
from train import main as train_main  # the entry point: its loop, clocked

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=GPT2_PADDED_VOCAB)


def make_base(directory, *, data_dir, dataset):
    """A run directory holding GPT-2 124M's shape with random weights, in the dataset's vocabulary."""
    meta = Dataset(data_dir, dataset).vocabulary
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT2_124M))
    Path(directory).mkdir(parents=True)
    save_weights(Path(directory) / BEST, model.state_dict(), model_args={**GPT2_124M, "dropout": 0.0}, meta=meta,
                 config={"dataset": dataset})


def measure(argv, steps):
    """(ms per step, the process's peak resident bytes) of train.py with argv, in this process."""
    cfg, _ = load_config(argv)
    validate(cfg)
    clock = train_in_process(train_main, cfg, steps=1 + steps, keep_init=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    return 1000 * statistics.median(clock.seconds[1:]), peak


def child(variant, argv, steps):
    """One measurement in a fresh process: its peak memory is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"argv": argv, "steps": steps})]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the {variant} run failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv):
    if argv[:1] == ["--child"]:
        spec = json.loads(argv[1])
        ms, peak = measure(spec["argv"], spec["steps"])
        print(json.dumps({"ms": ms, "peak": peak}))
        return 0
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--dataset", default="shakespeare")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one untimed)")
    parser.add_argument("--rounds", type=int, default=3)
    args, extra = parser.parse_known(argv)
    if min(args.batch_size, args.block_size, args.lora_rank, args.steps, args.rounds) <= 0:
        raise UserError("--batch_size, --block_size, --lora_rank, --steps and --rounds must be positive")
    with tempfile.TemporaryDirectory(prefix="gpt-toolkit-bench-lora-") as tmp:
        make_base(Path(tmp) / "base", data_dir=args.data_dir, dataset=args.dataset)
        common = [f"--init_from={Path(tmp) / 'base'}", f"--dataset={args.dataset}", f"--data_dir={args.data_dir}",
                  f"--batch_size={args.batch_size}", f"--block_size={args.block_size}", "--gradient_accumulation_steps=1",
                  "--dropout=0.0", *extra]
        variants = {"full fine-tuning": common, f"LoRA rank {args.lora_rank}": [*common, f"--lora_rank={args.lora_rank}"]}
        results = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, run_argv in (variants.items() if r % 2 == 0 else reversed(variants.items())):
                results[name].append(child(name, run_argv, args.steps))
                print(f"round {r + 1}: {name}: {results[name][-1]['ms']:.0f} ms/step, peak "
                      f"{results[name][-1]['peak'] / 2**30:.2f} GiB", flush=True)
    print(f"\nGPT-2 124M shape, batch {args.batch_size} x {args.block_size}, {cpu_name()}; medians of {args.rounds} rounds:")
    med = {name: (statistics.median(x["ms"] for x in rs), statistics.median(x["peak"] for x in rs))
           for name, rs in results.items()}
    for name, (ms, peak) in med.items():
        print(f"  {name:18s} {ms:8.0f} ms/step   peak memory {peak / 2**30:6.2f} GiB")
    (full_ms, full_peak), (lora_ms, lora_peak) = med.values()
    print(f"  LoRA / full: step time {lora_ms / full_ms:.2f}x, peak memory {lora_peak / full_peak:.2f}x")
    return 0


if __name__ == "__main__":
    run_main(main)
