"""Hyperparameter search with Optuna: each trial is one train.py run; trials that fall behind are pruned on
their intermediate val loss. Needs the optuna package (pip install optuna).

    python tools/sweep.py config/train_shakespeare_char_cpu.py --max_iters=500 --trials=12 \\
        --search learning_rate=log:1e-4:1e-2 --search dropout=0:0.3 --search n_layer=int:2:6

Search spaces:  KEY=LOW:HIGH (uniform float)  KEY=log:LOW:HIGH  KEY=int:LOW:HIGH  KEY=choice:A,B,C
Everything else (config files, --key=value) is passed to every trial. Trials run in --study_dir/trial_N;
the end prints a table of all trials and the command that reproduces the best one.
"""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from tabulate import tabulate

from configurator import parse_value
from gpt_toolkit.core import system
from gpt_toolkit.core.cli import tool_parser, training_config
from gpt_toolkit.core.config import CHOICES, Config
from gpt_toolkit.core.errors import ConfigError, UserError, import_optional, run_main
from gpt_toolkit.training.runlog import read_metrics


def parser():
    p = tool_parser(__file__, __doc__, training_config=True)
    p.add_argument("--search", action="append", default=[], metavar="KEY=RANGE", help="a search space (repeatable)")
    p.add_argument("--trials", type=int, default=10, help="trials to run (default 10)")
    p.add_argument("--study_dir", default="sweeps/sweep", help="where trial_N/ out_dirs go (default sweeps/sweep)")
    p.add_argument("--pruner", choices=["median", "none"], default="median", help="stop trials that fall behind "
                   "(default median)")
    p.add_argument("--sampler_seed", type=int, default=0, help="the TPE sampler's seed (default 0)")
    return p


def parse_search(spec):
    """'learning_rate=log:1e-4:1e-2' -> ('learning_rate', 'log', (1e-4, 1e-2)), checked against train.py's keys."""
    key, sep, rule = spec.partition("=")
    if not sep or key not in vars(Config):
        raise ConfigError(f"--search {spec}: expected KEY=RANGE with a train.py key (e.g. learning_rate=log:1e-4:1e-2)")
    kind, _, rest = rule.partition(":") if rule.split(":")[0] in ("log", "int", "choice") else ("float", "", rule)
    if kind == "choice":
        default, choices = getattr(Config, key), CHOICES.get(key)
        return key, kind, [parse_value(key, v, default, choices, f"--search {spec}") for v in rest.split(",")]
    try:
        low, high = (int(x) if kind == "int" else float(x) for x in rest.split(":"))
    except ValueError:
        raise ConfigError(f"--search {spec}: range must be LOW:HIGH numbers, or choice:A,B,C") from None
    if not low < high or (kind == "log" and low <= 0):
        raise ConfigError(f"--search {spec}: need LOW < HIGH (and LOW > 0 for log)")
    return key, kind, (low, high)


def suggest(trial, key, kind, bounds):
    if kind == "choice":
        return trial.suggest_categorical(key, bounds)
    if kind == "int":
        return trial.suggest_int(key, *bounds)
    return trial.suggest_float(key, *bounds, log=(kind == "log"))


def run_trial(trial, cmd, metrics_path, poll_s=0.5):
    """Run one training command, report each eval's val loss to the trial, stop it early if the pruner says so.
    Returns the best val loss. Raises optuna.TrialPruned when pruned, UserError when training fails."""
    optuna = import_optional("optuna", "tools/sweep.py")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **system.utf8_pipes())
    seen, best = 0, float("inf")
    try:
        while True:
            finished = proc.poll() is not None
            records, seen = read_metrics(metrics_path, seen)  # a line still being written is read next time
            for record in records:
                if record.get("type") == "eval":
                    best = min(best, record["val_loss"])
                    trial.report(record["val_loss"], record["step"])
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"val loss {record['val_loss']:.4f} at step {record['step']}")
            if finished:
                break
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if proc.returncode != 0:
        last = (proc.stderr.read().strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"trial {trial.number} failed: {last}")
    return best


def main(argv):
    own, train_args = parser().parse_known(argv)
    training_config(train_args)  # checked now, not in every trial
    if not own.search:
        raise ConfigError("nothing to search: add at least one --search KEY=RANGE (e.g. --search learning_rate=log:1e-4:1e-2)")
    searches = [parse_search(s) for s in own.search]
    own = vars(own)
    optuna = import_optional("optuna", "tools/sweep.py")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir = Path(own["study_dir"])
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if own["pruner"] == "median" else optuna.pruners.NopPruner()
    sampler = optuna.samplers.TPESampler(seed=own["sampler_seed"])
    study = optuna.create_study(direction="minimize", pruner=pruner, sampler=sampler)

    def objective(trial):
        params = {key: suggest(trial, key, kind, bounds) for key, kind, bounds in searches}
        out_dir = study_dir / f"trial_{trial.number}"
        overrides = [f"--{k}={v}" for k, v in params.items()]
        cmd = [sys.executable, str(ROOT / "train.py"), *train_args, *overrides, f"--out_dir={out_dir}"]
        trial.set_user_attr("command", " ".join(["python train.py", *train_args, *overrides, f"--out_dir={out_dir}"]))
        print(f"trial {trial.number}: {' '.join(overrides)}", flush=True)
        return run_trial(trial, cmd, out_dir / "metrics.jsonl")

    study.optimize(objective, n_trials=own["trials"], catch=())
    rows = []
    for t in study.trials:
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        value = f"{t.value:.4f}" if t.value is not None else "-"
        rows.append([t.number, t.state.name.lower(), *(t.params.get(k) for k, _, _ in searches), value, last_step])
    print(tabulate(rows, headers=["trial", "state", *(k for k, _, _ in searches), "best val", "last step"],
                   tablefmt="github", disable_numparse=True))
    best = study.best_trial
    print(f"best: trial {best.number}, val loss {best.value:.4f}, {best.params}")
    print(f"reproduce: {best.user_attrs['command']}")
    return 0


if __name__ == "__main__":
    run_main(main)
