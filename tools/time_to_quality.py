"""Time to quality: whole training runs side by side, each timed from start to exit and scored on every token of
the val split (its ckpt.pt, float32). The figures behind README's Performance section.

    python tools/time_to_quality.py [--nanogpt=PATH] [--rounds=1] [--runs=NAME,NAME] [--data_dir=data]
                                    [--seeds=1337,1,2] [--train_args="--max_iters=600 ..."]

Runs (alternated round by round, so the machine's drift hits all alike; --runs picks some):
  nanogpt          nanoGPT's own train.py (a checkout at --nanogpt) with its README's CPU recipe
  recipe           this toolkit's train.py with exactly those hyperparameters
  cpu              config/train_shakespeare_char_cpu.py: nanoGPT's recipe at a better learning rate (2000 AdamW steps)
  cpu_muon         that config with --optimizer=muon
  fast             config/train_shakespeare_char_fast.py, the README's main job: 2 layers, Muon, batch 32, 280 steps
  speedrun         config/train_shakespeare_char_speedrun.py: 4 x 128 with model options, Muon, 300 steps
  record           config/train_shakespeare_char_record.py: the speedrun compiled, 1100 steps (val under 1.50)
--seeds gives each round one seed for our runs (round i: the i-th seed; nanoGPT's keeps its own), so three rounds are
also three seeds; --train_args go to our runs too.
Each run writes to a temp directory; nothing in the toolkit's out dirs is touched. A run that compiles (the record
config) compiles cold every time, as a user's first run does: torch's inductor cache is a fresh directory per run.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script, users_environment

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit.core import system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.models.checkpoint import BEST, load_checkpoint
from gpt_toolkit.training.evaluation import checkpoint_split

# nanoGPT's README: "python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
# --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
# --lr_decay_iters=2000 --dropout=0.0"
NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                  "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
DEFAULT_RUNS = "nanogpt,recipe,cpu,cpu_muon,fast"
RUNS = {
    "nanogpt": None,
    "recipe": NANOGPT_RECIPE + ["--dtype=float32"],  # nanoGPT's recipe on CPU runs float32 (its float16 would be slow)
    "cpu": ["config/train_shakespeare_char_cpu.py"],
    "cpu_muon": ["config/train_shakespeare_char_cpu.py", "--optimizer=muon"],
    "fast": ["config/train_shakespeare_char_fast.py"],
    "speedrun": ["config/train_shakespeare_char_speedrun.py"],
    "record": ["config/train_shakespeare_char_record.py"],
}


def run_once(name, work, data_dir, nanogpt, extra=()):
    """(wall seconds, out_dir) of one whole run, started as a user starts it."""
    out = work / f"{name}-{time.time_ns()}"
    if name == "nanogpt":
        # nanoGPT reads data/<dataset> under its working directory: give it ours
        cwd = work / "nanogpt-cwd"
        (cwd / "data").mkdir(parents=True, exist_ok=True)
        link = cwd / "data" / "shakespeare_char"
        if not link.exists():
            link.symlink_to(Path(data_dir).resolve() / "shakespeare_char")
        (cwd / "config").mkdir(exist_ok=True)
        for name in ("config/train_shakespeare_char.py", "configurator.py"):  # train.py reads them from its cwd
            (cwd / name).write_bytes((Path(nanogpt) / name).read_bytes())
        cmd = [sys.executable, str(Path(nanogpt) / "train.py"), *NANOGPT_RECIPE, f"--out_dir={out}"]
        env = dict(users_environment(), PYTHONPATH=str(Path(nanogpt)))  # not our OpenMP setting: as a user runs it
    else:
        # a compiled run compiles cold, as a user's first run does: inductor's cache is a fresh directory each time
        cwd, env = ROOT, dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(out) + "-inductor-cache")
        cmd = [sys.executable, str(ROOT / "train.py"), *RUNS[name], *extra, f"--out_dir={out}", f"--data_dir={data_dir}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, **system.utf8_pipes(env))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise UserError(f"run {name} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr else ''}")
    return wall, out


def score(out_dir, data_dir):
    ckpt = load_checkpoint(out_dir / BEST, optimizer=False)
    scoring = checkpoint_split(ckpt, split="val", dataset="shakespeare_char", data_dir=data_dir)
    return scoring.score(batch_size=32, device="cpu", ctx=torch.autocast("cpu", enabled=False)).loss


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--nanogpt", help="a nanoGPT checkout (git archive of karpathy/nanoGPT); without it, no "
                                          "nanogpt run")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated runs (default {DEFAULT_RUNS})")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all runs (default 1)")
    parser.add_argument("--data_dir", default=str(ROOT / "data"), help="where shakespeare_char is prepared")
    parser.add_argument("--seeds", default="", help="comma-separated seeds, one per round for our runs (default: the "
                                                    "config's seed in every round)")
    parser.add_argument("--train_args", default="", help="more --key=value flags for our runs, e.g. --max_iters=600")
    args, _ = parser.parse(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise UserError(f"unknown run {unknown[0]}: choose from {', '.join(RUNS)}")
    if "nanogpt" in names and not args.nanogpt:
        if args.runs != DEFAULT_RUNS:
            raise UserError("--runs names nanogpt but no checkout is given: pass --nanogpt=PATH (a git archive of "
                            "karpathy/nanoGPT)")
        names.remove("nanogpt")
    if args.nanogpt and not (Path(args.nanogpt) / "train.py").exists():
        raise UserError(f"--nanogpt={args.nanogpt} has no train.py: give the directory of a nanoGPT checkout")
    if args.rounds < 1:
        raise UserError(f"--rounds={args.rounds} must be at least 1")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds={args.seeds} must be comma-separated whole numbers, e.g. 1337,1,2") from None
    if seeds and len(seeds) != args.rounds:
        raise UserError(f"--seeds names {len(seeds)} seeds for {args.rounds} rounds: give one seed per round (and "
                        f"--rounds={len(seeds)})")
    if not (Path(args.data_dir) / "shakespeare_char" / "val.bin").exists():
        raise UserError(f"no shakespeare_char in {args.data_dir}: run python data/shakespeare_char/prepare.py")
    extra = args.train_args.split()
    walls, losses = {n: [] for n in names}, {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            seed = seeds[round_] if seeds else None
            for name in names:
                ours = name != "nanogpt"
                flags = [*extra, *([f"--seed={seed}"] if seed is not None else [])] if ours else []
                wall, out = run_once(name, Path(tmp), args.data_dir, args.nanogpt, flags)
                walls[name].append(wall)
                losses[name].append(score(out, args.data_dir))
                shown = f"  (seed {seed})" if seed is not None and ours else ""
                print(f"{name:<10} {wall:7.1f} s  whole-split val loss {losses[name][-1]:.4f}{shown}", flush=True)
    print(f"\n{'run':<10} {'wall (median)':>14} {'val loss (whole split)':>24}   vs nanoGPT")
    base = statistics.median(walls["nanogpt"]) if "nanogpt" in walls else None
    for name in names:
        wall = statistics.median(walls[name])
        ratio = "" if base is None else "1.00x" if name == "nanogpt" else versus(wall, base)
        print(f"{name:<10} {wall:12.1f} s {statistics.median(losses[name]):24.4f}   {ratio}")
    return 0


def versus(wall, base):
    """A run's median wall time against nanoGPT's, said the way round that reads as more than 1."""
    return f"{base / wall:.2f}x faster" if wall <= base else f"{wall / base:.2f}x its time"


if __name__ == "__main__":
    run_main(main)
