"""A busy CPU: how sample.py and train.py fare when they share the machine, under each OpenMP thread setting.

    python tools/bench_busy.py [--rounds=2] [--tokens=1500] [--data_dir=data] [--config=config/train_shakespeare_char_cpu.py]

Learners train in one terminal and sample in another. For each setting (torch's defaults; GOMP_SPINCOUNT=1000; 3000,
what the toolkit's scripts set unless you set it; 10000; OMP_WAIT_POLICY=PASSIVE; OMP_NUM_THREADS=1), in alternating
rounds: train.py's time per step alone and with sample.py streaming beside it, and sample.py's streaming speed alone
and with a training beside it (--config's model, the CPU recipe's by default; 2 threads). A sample model of 0.1M
parameters is trained first (a few seconds). Figures: medians over the rounds; docs/performance.md has them.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core import system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main

SETTINGS = {"torch's defaults": {},
            "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
            "GOMP_SPINCOUNT=3000 (ours)": {"GOMP_SPINCOUNT": "3000"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
            "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}
TRAIN = ["--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000", "--log_interval=1"]


def parser():
    p = tool_parser(__file__, __doc__)
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating the settings (default 2)")
    p.add_argument("--tokens", type=int, default=1500, help="characters sample.py streams (default 1500)")
    p.add_argument("--data_dir", default="data", help="where shakespeare_char is prepared (default data)")
    p.add_argument("--config", default="config/train_shakespeare_char_cpu.py",
                   help="the training (default config/train_shakespeare_char_cpu.py, the CPU recipe)")
    return p


def env_of(setting):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    return {**env, "PYTHONUNBUFFERED": "1", "GPT_TOOLKIT_OMP_DEFAULTS": "1", **SETTINGS[setting]}  # only these set


def stream_rate(out_dir, tokens, env):
    """Characters per second sample.py streams (from its first character to its last, start-up left out)."""
    cmd = [sys.executable, "sample.py", f"--out_dir={out_dir}", "--num_samples=1", f"--max_new_tokens={tokens}",
           "--seed=1", "--start=\n", "--stop_at_eot=False"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = last = None
    count = 0
    while chunk := proc.stdout.read1(4096):
        last = time.perf_counter()
        first = first or last
        count += len(chunk)
    if proc.wait() != 0 or count < tokens // 2:
        raise UserError(f"sample.py failed ({proc.returncode}): run it on {out_dir} to see why")
    return count / max(last - first, 1e-9)


def start_training(config, out_dir, data_dir, env):
    cmd = [sys.executable, "train.py", str(config), *TRAIN, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--overwrite=True"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def step_ms(lines):
    """Median ms per step of the iteration records among metrics.jsonl lines."""
    times = [json.loads(line)["time_ms"] for line in lines if '"train"' in line]
    return statistics.median(times) if times else None


def measure(setting, sample_dir, work, data_dir, tokens, config):
    """(train ms/step alone, with sample.py beside; sample chars/s alone, with a training beside)."""
    env = env_of(setting)
    quiet_rate = stream_rate(sample_dir, tokens, env)
    alone = work / "alone"
    proc = start_training(config, alone, data_dir, env)
    time.sleep(12)
    proc.terminate()
    proc.wait()
    quiet_step = step_ms((alone / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[8:])  # after allocation
    busy = work / "busy"
    proc = start_training(config, busy, data_dir, env)
    time.sleep(8)
    before = len((busy / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    busy_rate = stream_rate(sample_dir, tokens, env)
    lines = (busy / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[before:]
    proc.terminate()
    proc.wait()
    return quiet_step, step_ms(lines), quiet_rate, busy_rate


def main(argv):
    args = parser().parse(argv)[0]
    if args.rounds < 1 or args.tokens < 10:
        raise UserError("--rounds must be positive and --tokens at least 10")
    config = Path(args.config)
    config = (config if config.is_file() else ROOT / config).resolve()  # train.py runs from the toolkit's root
    if not config.is_file():
        raise UserError(f"--config={args.config}: no such file (e.g. config/train_shakespeare_char_fast.py)")
    with tempfile.TemporaryDirectory() as tmp:
        work, sample_dir = Path(tmp), Path(tmp) / "sample-model"
        r = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char_cpu.py", "--n_layer=2",
                            "--n_embd=64", "--n_head=2", "--max_iters=50", "--eval_interval=50",
                            f"--data_dir={args.data_dir}", f"--out_dir={sample_dir}"], cwd=ROOT, capture_output=True,
                           **system.utf8_pipes())
        if r.returncode != 0:
            raise UserError(f"could not train the sample model: {r.stderr.strip().splitlines()[-1]}")
        results = {s: [] for s in SETTINGS}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                results[setting].append(measure(setting, sample_dir, work, args.data_dir, args.tokens, config))
                print(f"  {setting}: {results[setting][-1]}", file=sys.stderr, flush=True)
    print(f"{'setting':<26} {'train ms/step':>14} {'beside sample':>14} {'x':>6}   {'sample chars/s':>15} "
          f"{'beside training':>16} {'x':>6}")
    for setting, rows in results.items():
        q, b, s, sb = (statistics.median(v for v in column if v is not None) for column in zip(*rows))
        print(f"{setting:<26} {q:14.1f} {b:14.1f} {b / q:6.2f}   {s:15.0f} {sb:16.0f} {sb / s:6.2f}")
    return 0


if __name__ == "__main__":
    run_main(main)
