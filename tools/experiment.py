"""Run the tutorial's experiments: one train.py run per call, its output tee'd to experiments/NAME.log.

    python tools/experiment.py run exp1_large_lr --max_iters=1000 --learning_rate=5e-3
    python tools/experiment.py finish exp1 --title "Experiment 1: parameters"

`run` trains `config/train_shakespeare_char.py` plus the given overrides into experiments/NAME, exactly the
tutorial's command. Environment knobs:
    DEVICE=cpu|cuda|...   passed as --device (default: train.py's auto)
    SCALE=cpu             shrink the run to finish in minutes on 2 CPU cores, keeping its ratios:
                          n_embd, block_size and batch_size / 4; max_iters, lr_decay_iters, warmup_iters and
                          eval_interval / 5; eval_iters / 10; weight_decay x 5, so that it shrinks the weights
                          as much over the shorter run (a 5x larger learning rate stays 5x larger; a 0, like
                          --warmup_iters=0 or --weight_decay=0.0, stays 0)
    RERUN=1               train again even if experiments/NAME already finished with these settings
    EXTRA="--key=value .."  appended to every run's overrides, last (e.g. EXTRA="--max_iters=4" tries a script)
Each run also gets experiments/NAME/conditions.json: the machine's 1-minute load average and the speed of a fixed CPU
matmul just before and just after it trains, so a table can say when runs' times are not comparable.
`finish` writes experiments/FAMILY_comparison.png and FAMILY_summary.md and prints the table; in --title, {batch}
(batch_size x gradient_accumulation_steps) and {KEY} (any config key) become the runs' own values.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core import hardware, system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.config import load_config, validate
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.files import atomic_write_text, keep_numbered, open_no_follow, remove_stale_temps
from gpt_toolkit.models.checkpoint import existing_checkpoints
from gpt_toolkit.reports.plots import plot_compare
from gpt_toolkit.reports.summary import CONDITIONS, fill_title, find_runs, format_table, summary_row, timing_note
from gpt_toolkit.training.runlog import read_run
from gpt_toolkit.training.timing import timed_steps
from train import main as train_main  # the entry point: its loop, clocked

BASE_CONFIG = "config/train_shakespeare_char.py"
CPU_SCALE = {"n_embd": 4, "block_size": 4, "batch_size": 4, "max_iters": 5, "lr_decay_iters": 5, "warmup_iters": 5,
             "eval_interval": 5, "eval_iters": 10}
# AdamW's decoupled weight decay shrinks the weights by lr x weight_decay each step: with 5x fewer steps, 5x the
# decay shrinks them as much over the run as the tutorial's does
CPU_SCALE_UP = {"weight_decay": 5}


def scaled_overrides(overrides, scale, base_config=BASE_CONFIG):
    """The overrides for this scale: as given for 'full'; for 'cpu', plus the shrunk value of every CPU_SCALE key."""
    if scale == "full":
        return list(overrides)
    if scale != "cpu":
        raise UserError(f"unknown SCALE={scale}: use SCALE=cpu, or leave it unset for the tutorial's full-size runs")
    cfg, _ = load_config([str(ROOT / base_config), *overrides])
    shrunk = {key: max(1, getattr(cfg, key) // factor) if getattr(cfg, key) else 0 for key, factor in CPU_SCALE.items()}
    shrunk.update({key: round(getattr(cfg, key) * factor, 6) for key, factor in CPU_SCALE_UP.items()})
    return [*overrides, *(f"--{k}={v}" for k, v in shrunk.items())]


def already_done(out_dir, overrides):
    """True when out_dir holds a run that trained to its end (not one a Ctrl-C stopped: it says 'training took' too)
    whose config has every override's value."""
    config_json, log = out_dir / "config.json", out_dir / "training.log"
    try:
        if not (config_json.exists() and log.exists() and read_run(log).ended == "finished"):
            return False
    except ValueError:  # no evaluation logged yet
        return False
    done = json.loads(config_json.read_text(encoding="utf-8"))
    wanted, _ = load_config([str(ROOT / BASE_CONFIG), *overrides])
    # out_dir, and overwrite (the script's own when it trains a run again), say where and how it ran, not what it is
    return all(done.get(k) == v for k, v in vars(wanted).items() if k not in ("out_dir", "overwrite"))


def run(name, overrides, exp_dir="experiments"):
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(exp_dir)  # plots and tables a killed finish or report left half-written
    overrides = scaled_overrides(overrides, os.environ.get("SCALE", "full") or "full")
    if os.environ.get("DEVICE"):
        overrides.append(f"--device={os.environ['DEVICE']}")
    overrides += shlex.split(os.environ.get("EXTRA", ""))
    out_dir = exp_dir / name
    if os.environ.get("RERUN") != "1" and already_done(out_dir, overrides):
        print(f"{name}: already finished with these settings in {out_dir} (RERUN=1 to train again)")
        return 0
    if existing_checkpoints(out_dir):
        print(f"{name}: training again; the checkpoints of the earlier run in {out_dir} are replaced")
        overrides.append("--overwrite=True")  # running the experiment script again asks for exactly this
    cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / BASE_CONFIG), *overrides, f"--out_dir={out_dir}"]
    print("$ python train.py " + " ".join([BASE_CONFIG, *overrides, f"--out_dir={out_dir}"]), flush=True)
    (out_dir / CONDITIONS).unlink(missing_ok=True)  # an earlier run's: never beside this run's logs
    start = machine_now()
    kept = keep_numbered(exp_dir / f"{name}.log")  # an earlier NAME.log (the learner's own tee, say) is kept as NAME.log.N
    if kept:
        print(f"{name}: the earlier {name}.log is kept as {kept.name}")
    fd = open_no_follow(exp_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # never through a link
    with open(fd, "w", encoding="utf-8") as log:  # the tutorial's `2>&1 | tee NAME.log`
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, **system.utf8_pipes())
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    if code == 0:  # a failed run leaves no conditions beside an earlier run's records
        conditions = {"start": start, "end": machine_now(), "cores": system.usable_cores()}
        atomic_write_text(out_dir / CONDITIONS, json.dumps(conditions, indent=2) + "\n")
        print(f"{name}: the machine ran a fixed CPU matmul at {start['matmul_gflops']:.1f} GFLOP/s before it trained "
              f"and {conditions['end']['matmul_gflops']:.1f} after, 1-minute load average {load_text(start)} and "
              f"{load_text(conditions['end'])} on {conditions['cores']} cores ({out_dir / CONDITIONS})")
    return code


def load_text(moment):
    return "unknown" if moment["load_avg"] is None else f"{moment['load_avg']:.2f}"


def machine_now(seconds=0.3, n=256):
    """How busy the machine is now: the 1-minute load average (None where the system has none: Windows) and the
    median speed of a fixed float32 n x n matmul on the CPU over `seconds` (GFLOP/s), which other work on the cores
    slows down. Taken between runs, when this tool trains nothing, so it measures everyone else's load."""
    load = system.load_average()
    rates = hardware.matmul_rates("cpu", "float32", n, seconds, warm=1)[1:]  # the first includes the cold start
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg": load,
            "matmul_gflops": round(statistics.median(rates) / 1e9, 2)}


def steps_for(seconds, overrides, probe=8):
    """The steps of the run these overrides describe that fit in `seconds` of training (evaluations aside): a few
    steps timed on this machine (the first, which allocates, left out). For experiments that compare settings at
    equal wall-clock time."""
    cfg, _ = load_config([str(ROOT / BASE_CONFIG), *overrides])
    validate(cfg)
    times = timed_steps(train_main, cfg, steps=probe)
    return max(1, int(seconds / statistics.median(times[1:])))


def finish(family, title, exp_dir="experiments", by_time=False):
    """The family's comparison plot (and with by_time one against seconds) and summary table, from every run named
    FAMILY_*."""
    runs = find_runs(exp_dir, f"{family}_*")
    if not runs:
        raise UserError(f"no {family}_* runs in {exp_dir}: run the experiment script first")
    title = fill_title(title, runs)
    png = plot_compare(runs, Path(exp_dir) / f"{family}_comparison.png", title)
    if by_time:
        print(f"wrote {plot_compare(runs, Path(exp_dir) / f'{family}_comparison_time.png', title + ' (by time)', True)}")
    rows = [summary_row(r) for r in runs]
    note = timing_note(runs)
    atomic_write_text(Path(exp_dir) / f"{family}_summary.md",
                      format_table(rows, "markdown") + "\n" + (f"\n{note}\n" if note else ""))
    print(format_table(rows, "grid"))
    if note:
        print(note)
    print(f"wrote {png} and {Path(exp_dir) / f'{family}_summary.md'}")
    return 0


def main(argv):
    parser = tool_parser(__file__, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train config/train_shakespeare_char.py + overrides into experiments/NAME")
    run_parser.add_argument("name")
    run_parser.add_argument("overrides", nargs=argparse.REMAINDER, help="train.py --key=value overrides")
    finish_parser = commands.add_parser("finish", help="FAMILY_comparison.png and FAMILY_summary.md from FAMILY_* runs")
    finish_parser.add_argument("family")
    finish_parser.add_argument("--title")
    finish_parser.add_flag("--by_time", help="also plot the curves against seconds")
    steps_parser = commands.add_parser("steps_for", help="how many steps of config/train_shakespeare_char.py + "
                                       "overrides fit in SECONDS of training on this machine (timed)")
    steps_parser.add_argument("seconds", type=float)
    steps_parser.add_argument("overrides", nargs=argparse.REMAINDER, help="train.py --key=value overrides")
    args, _ = parser.parse(argv)
    if args.command == "run":
        return run(args.name, args.overrides)
    if args.command == "steps_for":
        print(steps_for(args.seconds, args.overrides))
        return 0
    return finish(args.family, args.title or f"{args.family} comparison", by_time=args.by_time)


if __name__ == "__main__":
    run_main(main)
