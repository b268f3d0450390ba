"""Finished runs side by side: the summary table of an experiments directory (the tutorial's columns plus best val
loss, val bits per byte, parameters, tokens/s and the overfitting verdict), and how far two runs' loss curves are
apart."""
import csv
import fnmatch
import io
import json
import re
import sys
from pathlib import Path

from tabulate import tabulate

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.training.runlog import read_run

HEADERS = ["Experiment", "Train Loss", "Val Loss", "Gap", "Time", "Best Val", "Best Step", "Val BPB", "Params", "Tokens/s",
           "Verdict"]
SORT_KEYS = {"name": None, "val": 2, "best": 5, "bpb": 7}  # --sort: the column a table is ordered by (lowest first)
BANDS = [(0.1, "healthy"), (0.3, "slight overfitting"), (0.5, "moderate overfitting")]  # tutorial ch04 2.3
# Both losses ended this far above their step-0 values: the run diverged (its train loss rose too, so it is no
# overfitting; a fine-tune's val loss can rise above a low start while its train loss falls)
DIVERGED_MARGIN = 0.05


def run_verdict(run):
    """The tutorial's overfitting verdict of a run's last evaluation, unless both its losses ended above where they
    started at step 0 (diverged: no band of the gap applies) or it has only its first evaluation; ", unfinished" when
    its train.py log shows it stopped before its end (a signal, or no end line: killed, or still running)."""
    steps, train, val = run.steps, run.train_losses, run.val_losses
    if steps[-1] == 0:
        said = "untrained (step 0 only)"
    elif steps[0] == 0 and val[-1] > val[0] + DIVERGED_MARGIN and train[-1] > train[0] + DIVERGED_MARGIN:
        said = "diverged (val loss above its start)"
    else:
        said = overfitting_verdict(val[-1] - train[-1])
    return said + (", unfinished" if run.ended in (None, "interrupted") else "")


def overfitting_verdict(gap):
    """the tutorial's bands on val - train: < 0.1 healthy, < 0.3 slight, < 0.5 moderate, else severe."""
    for limit, verdict in BANDS:
        if gap < limit:
            return verdict
    return "severe overfitting"


def find_runs(exp_dir, match="*"):
    """Runs in exp_dir by name: a directory wins over a same-named NAME.log (it has more in it)."""
    exp_dir = Path(exp_dir)
    if exp_dir.is_file():
        raise UserError(f"'{exp_dir}' is a file: pass the directory of runs (e.g. {exp_dir.parent}); for one run's "
                        f"log, tools/plot_loss.py {exp_dir}")
    if not exp_dir.is_dir():
        raise UserError(f"experiments directory '{exp_dir}' not found: run an experiment first or pass its path")
    found = {}
    for entry in sorted(exp_dir.iterdir()):
        if entry.is_dir() and any((entry / f).exists() for f in ("training.log", "metrics.jsonl")):
            found[entry.name] = entry
        elif entry.suffix == ".log" and entry.is_file():
            found.setdefault(entry.stem, entry)
    runs = []
    for name, path in sorted(found.items()):
        if not fnmatch.fnmatch(name, match):
            continue
        try:
            runs.append(read_run(path, name))
        except ValueError as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
    return runs


def summary_row(run):
    train, val = run.train_losses[-1], run.val_losses[-1]
    best_step, best_val = run.best_val()
    rate = run.tokens_per_s()
    return [run.name, f"{train:.4f}", f"{val:.4f}", f"{val - train:.4f}",
            f"{run.took:.1f}s" if run.took is not None else "N/A", f"{best_val:.4f}", best_step,
            f"{run.val_bpb[run.steps[-1]]:.4f}" if run.steps[-1] in run.val_bpb else "N/A",
            f"{run.num_params / 1e6:.2f}M" if run.num_params else "N/A", f"{rate:,.0f}" if rate else "N/A",
            run_verdict(run)]


def sorted_rows(rows, key):
    """Rows ordered by a SORT_KEYS column, lowest first (rows without a value last), or as found for 'name'."""
    column = SORT_KEYS[key]
    if column is None:
        return rows
    return sorted(rows, key=lambda r: (r[column] == "N/A", float(r[column]) if r[column] != "N/A" else 0.0))


def format_table(rows, fmt):
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out).writerows([HEADERS, *rows])
        return out.getvalue()
    return tabulate(rows, headers=HEADERS, tablefmt={"grid": "grid", "markdown": "github"}[fmt], disable_numparse=True)


def is_table(head):
    """Whether a file's first bytes are a table format_table wrote (its header row, in any of the three formats)."""
    lines = head.decode("utf-8", errors="replace").splitlines()[:3]
    return any(all(name in line for name in HEADERS[:3]) for line in lines)


def curve_difference(run_a, run_b, which="val"):
    """(steps both runs evaluated, mean |a - b|, max |a - b|) of their val (or train) losses."""
    index = 1 if which == "val" else 0
    steps = sorted(set(run_a.evals) & set(run_b.evals))
    if not steps:
        raise UserError(f"{run_a.name} and {run_b.name} have no evaluation step in common: "
                        f"compare runs with the same eval_interval")
    diffs = [abs(run_a.evals[s][index] - run_b.evals[s][index]) for s in steps]
    return steps, sum(diffs) / len(diffs), max(diffs)


def tolerance_for(a, b):
    """(tolerance, why) for how far two runs' val curves may differ and still count as the same computation (the
    tutorial's experiment 2: batch 64 x 1 against 16 x 4 accumulated). Measured at SCALE=cpu (docs/experiments.md):
    without dropout the difference is rounding only, 0.000001 in float32 and 0.0003 in bfloat16; with dropout the two
    runs draw different masks for micro-batches of different shapes, and differ by 0.0115 in float32 and 0.0112 in
    bfloat16 alike, so the tutorial's 0.01 is a rough figure, not a float32 bound."""
    configs = [run.config for run in (a, b)]
    if not all(configs):
        return 0.01, "the tutorial's; the runs' dropout and precision are unknown (no config.json beside their logs)"
    dropout = max(c.get("dropout", 0.0) for c in configs)
    dtypes = sorted({c.get("resolved_dtype", "float32") for c in configs})
    if dropout > 0:
        return 0.02, (f"dropout {dropout}: the runs draw different masks for micro-batches of different shapes, so they "
                      f"agree only to dropout's noise, in any precision (measured: 0.0115 in float32, 0.0112 in "
                      f"bfloat16; the tutorial's < 0.01 is a rough figure)")
    return 0.001, f"{'/'.join(dtypes)} rounding only (measured without dropout: 0.000001 in float32, 0.0003 in bfloat16)"


def load_runs(paths):
    runs = []
    for p in paths:
        try:
            runs.append(read_run(p))
        except ValueError as e:
            raise UserError(f"{e}: pass a train.py log, a metrics.jsonl or an out_dir") from None
    return runs


# ----------------------------------------------------------------------------- titles and timings from the runs

def batch_shape(run):
    """'16 x 1': the run's batch_size x gradient_accumulation_steps from its config.json; None without one."""
    b, g = run.config.get("batch_size"), run.config.get("gradient_accumulation_steps")
    return f"{b} x {g}" if b is not None and g is not None else None


def fill_title(title, runs):
    """The title with {batch} (the runs' batch_size x gradient_accumulation_steps, the least accumulated first) and
    {KEY} (a config.json key, in run order) filled in from the runs' own settings: their distinct values joined by
    ' vs ', '?' where a run does not record it. A plot's title then says what the runs were (experiment 2 at
    SCALE=cpu is 16 x 1 vs 4 x 4, not the tutorial's 64 x 1 vs 16 x 4). Other braces stay as they are."""
    keys = {k for run in runs for k in run.config} | {"batch"}

    def values(match):
        key = match.group(1)
        if key not in keys:
            return match.group(0)
        if key == "batch":
            runs_ = sorted(runs, key=lambda r: (batch_shape(r) is None, r.config.get("gradient_accumulation_steps") or 0))
            found = [batch_shape(run) for run in runs_]
        else:
            found = [run.config.get(key) for run in runs]
        return " vs ".join(dict.fromkeys("?" if v is None else str(v) for v in found))
    return re.sub(r"\{(\w+)\}", values, title)


CONDITIONS = "conditions.json"  # beside a run's config.json: the machine's state before and after it (tools/experiment.py)
SPEED_SPREAD = 1.5  # runs whose machine ran the fixed matmul this many times faster or slower: timings not comparable
BUSY_LOAD = 1.5  # a load average above this many times the cores: others' work on top of a run's own (about a load of
# its cores' count: torch runs a thread per core)


def read_conditions(run):
    """The run's conditions.json ({"start": {...}, "end": {...}, "cores": N}), or None: a bare log, a run trained
    without tools/experiment.py or before it recorded them, a damaged file."""
    path = Path(run.path) / CONDITIONS if run.path is not None and Path(run.path).is_dir() else None
    try:
        conditions = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(conditions, dict) or not all(isinstance(conditions.get(k), dict) for k in ("start", "end")):
        return None
    speeds = [conditions[k].get("matmul_gflops") for k in ("start", "end")]
    if not all(_number(v) and v > 0 for v in speeds):
        return None
    return conditions


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _loads(conditions):
    """The run's 1-minute load averages before and after it, or [] where the system has none (Windows)."""
    loads = [conditions[k].get("load_avg") for k in ("start", "end")]
    return loads if all(_number(v) for v in loads) else []


def _busy(conditions):
    """Whether others' work kept the machine busy before or after the run: a load average above BUSY_LOAD x cores."""
    cores = conditions.get("cores")
    return _number(cores) and cores > 0 and any(load > BUSY_LOAD * cores for load in _loads(conditions))


def _conditions_text(name, conditions):
    speeds = "/".join(f"{conditions[k]['matmul_gflops']:.1f}" for k in ("start", "end"))
    loads = _loads(conditions)
    cores = f" on {conditions['cores']} cores" if _number(conditions.get("cores")) else ""
    load = "/".join(f"{v:.1f}" for v in loads) + cores if loads else "unknown"
    return f"{name} {speeds} GFLOP/s, load average {load}"


def timing_note(runs):
    """Why the Time and Tokens/s columns of these runs are not comparable, or None when nothing says so: the machine
    ran a fixed CPU matmul more than SPEED_SPREAD x faster around some runs than around others, or others' work kept
    it busy (a load average above BUSY_LOAD x its cores; the reported first hour saw 3x the time for identical work
    under load), the runs trained on different devices or precisions, or only some of them recorded the machine's
    state."""
    reasons = []
    devices = {run.name: f"{run.config['resolved_device']}/{run.config.get('resolved_dtype', '?')}"
               for run in runs if run.config.get("resolved_device")}
    if len(set(devices.values())) > 1:
        reasons.append("they trained on different devices or precisions ("
                       + ", ".join(f"{name} {device}" for name, device in devices.items()) + ")")
    known = {run.name: c for run in runs if (c := read_conditions(run)) is not None}
    if known:
        loaded = []
        slowest = {name: min(c["start"]["matmul_gflops"], c["end"]["matmul_gflops"]) for name, c in known.items()}
        spread = max(slowest.values()) / min(slowest.values())
        if spread > SPEED_SPREAD:
            loaded.append(f"the machine was up to {spread:.1f}x slower around some of them than around others")
        busy = [name for name, c in known.items() if _busy(c)]
        if busy:
            around = "all of them" if len(busy) == len(known) > 1 else ", ".join(busy)
            loaded.append(f"others' work kept the machine busy around {around} (a load average above "
                          f"{BUSY_LOAD:g}x its cores, where a run of ours alone makes about 1x), so their times depend "
                          f"on what else ran")
        if loaded:
            reasons.append("; ".join(loaded) + " (a fixed CPU matmul and the 1-minute load average, before/after each "
                           "run: " + "; ".join(_conditions_text(name, c) for name, c in known.items()) + ")")
        unknown = [run.name for run in runs if run.name not in known]
        if unknown:
            reasons.append(f"the machine's state was not recorded for {', '.join(unknown)} (trained before "
                           f"tools/experiment.py recorded it, or by train.py directly)")
    if not reasons:
        return None
    return ("Time and Tokens/s are not comparable between these runs: " + "; ".join(reasons)
            + ". Compare them by loss; for their speed, run them again on an otherwise idle machine (RERUN=1).")
