"""Finished runs side by side: the summary table of an experiments directory (the tutorial's columns plus best val
loss, val bits per byte, parameters, tokens/s and the overfitting verdict), and how far two runs' loss curves are
apart."""
import csv
import fnmatch
import io
import sys
from pathlib import Path

from tabulate import tabulate

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.training.runlog import read_run

HEADERS = ["Experiment", "Train Loss", "Val Loss", "Gap", "Time", "Best Val", "Best Step", "Val BPB", "Params", "Tokens/s",
           "Verdict"]
SORT_KEYS = {"name": None, "val": 2, "best": 5, "bpb": 7}  # --sort: the column a table is ordered by (lowest first)
BANDS = [(0.1, "healthy"), (0.3, "slight overfitting"), (0.5, "moderate overfitting")]  # tutorial ch04 2.3


def overfitting_verdict(gap):
    """the tutorial's bands on val - train: < 0.1 healthy, < 0.3 slight, < 0.5 moderate, else severe."""
    for limit, verdict in BANDS:
        if gap < limit:
            return verdict
    return "severe overfitting"


def find_runs(exp_dir, match="*"):
    """Runs in exp_dir by name: a directory wins over a same-named NAME.log (it has more in it)."""
    exp_dir = Path(exp_dir)
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
            overfitting_verdict(val - train)]


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
