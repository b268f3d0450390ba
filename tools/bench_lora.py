"""LoRA against full fine-tuning at GPT-2 124M's shape, from a real trained run: peak memory and time per step of
the same batch; and what a reader (sample.py) holds to generate from that run.

    python tools/bench_lora.py [--dataset=shakespeare] [--batch_size=2] [--block_size=128] [--lora_rank=8]
                               [--steps=3] [--rounds=3] [--key=value ...]

The base is a run of GPT-2 124M's shape trained by train.py for one step (random weights otherwise: offline; speed
and memory do not depend on the weights), so its checkpoint holds what every trained run's does: the weights and
AdamW's state, twice their size. The data is a GPT-2-tokenized dataset (python data/shakespeare/prepare.py). Each
measurement is train.py itself (gpt_toolkit.training.timing) in a fresh process, so its peak resident set is that
run's peak memory (the base's checkpoint loaded, the model, its optimizer, the steps); one untimed step, then --steps
timed (median). The two variants alternate for --rounds rounds; the ratios are LoRA's over full fine-tuning's medians.
Extra --key=value arguments reach both runs (e.g. --lora_targets=c_attn, --dtype=float32). Last, sample.py on the base
(16 new tokens) in a fresh process: its peak above the interpreter with torch imported, against the weights' size.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback


from gpt_toolkit.core import system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.config import load_config, validate
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.hardware import cpu_name
from gpt_toolkit.training.timing import train_in_process
from model import GPT, GPT2_PADDED_VOCAB, GPTConfig
from train import main as train_main  # the entry point: its loop, clocked

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=GPT2_PADDED_VOCAB)


def make_base(directory, *, data_dir, dataset):
    """A run directory as train.py leaves it: GPT-2 124M's shape, one step trained (its checkpoint holds the weights and
    AdamW's state), in the dataset's vocabulary. Trained in a fresh process: this one's peak stays its own."""
    argv = ["--init_from=scratch", f"--out_dir={directory}", f"--dataset={dataset}", f"--data_dir={data_dir}",
            "--max_iters=1", "--eval_iters=1", "--eval_interval=1", "--batch_size=1", "--gradient_accumulation_steps=1",
            "--dropout=0.0", "--bias=True", "--compile=False", "--check_memory=False",
            *(f"--{k}={v}" for k, v in GPT2_124M.items() if k != "vocab_size")]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, **system.utf8_pipes())
    if r.returncode != 0:
        raise UserError(f"training the base failed: {(r.stderr.strip().splitlines() or ['(no output)'])[-1]}")


def rss_peak():
    """This process's peak resident bytes: Linux's VmHWM (ru_maxrss would include the parent's: Linux keeps it across
    exec), else ru_maxrss."""
    return system.peak_resident()


def measure(argv, steps):
    """(ms per step, the process's peak resident bytes) of train.py with argv, in this process."""
    cfg, _ = load_config(argv)
    validate(cfg)
    clock = train_in_process(train_main, cfg, steps=1 + steps, keep_init=True)
    return 1000 * statistics.median(clock.seconds[1:]), rss_peak()


def measure_sample(out_dir):
    """(ms, the peak resident bytes sample.py adds to an interpreter with torch imported) of 16 new tokens."""
    import contextlib
    import io
    import time

    from sample import main as sample_main  # the script's entry point, run in this process to see its peak
    before, t0 = rss_peak(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        sample_main([f"--out_dir={out_dir}", "--num_samples=1", "--max_new_tokens=16", "--compile=False"])
    return 1000 * (time.perf_counter() - t0), rss_peak() - before


def child(variant, argv, steps):
    """One measurement in a fresh process: its peak memory is its own."""
    spec = {"sample": argv} if variant == "sample.py" else {"argv": argv, "steps": steps}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, **system.utf8_pipes(dict(os.environ, PYTHONUNBUFFERED="1")))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the {variant} run failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv):
    if argv[:1] == ["--child"]:
        spec = json.loads(argv[1])
        ms, peak = measure_sample(spec["sample"]) if "sample" in spec else measure(spec["argv"], spec["steps"])
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
        reader = child("sample.py", str(Path(tmp) / "base"), 0)
    print(f"\nGPT-2 124M shape, batch {args.batch_size} x {args.block_size}, {cpu_name()}; medians of {args.rounds} rounds:")
    med = {name: (statistics.median(x["ms"] for x in rs), statistics.median(x["peak"] for x in rs))
           for name, rs in results.items()}
    for name, (ms, peak) in med.items():
        print(f"  {name:18s} {ms:8.0f} ms/step   peak memory {peak / 2**30:6.2f} GiB")
    (full_ms, full_peak), (lora_ms, lora_peak) = med.values()
    print(f"  LoRA / full: step time {lora_ms / full_ms:.2f}x, peak memory {lora_peak / full_peak:.2f}x")
    weights = sum(p.numel() for p in GPT(GPTConfig(**GPT2_124M)).parameters()) * 4  # float32, the tied matrix once
    kv = 2 * GPT2_124M["n_layer"] * GPT2_124M["block_size"] * GPT2_124M["n_embd"] * 4
    print(f"  sample.py from the run: {reader['peak'] / 2**20:.0f} MiB above the interpreter = "
          f"{reader['peak'] / weights:.2f}x the weights ({weights / 2**20:.0f} MiB; a whole KV cache adds "
          f"{kv / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    run_main(main)
