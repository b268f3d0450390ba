"""Summarize every run in an experiments directory as one table.

    python tools/summarize_experiments.py                      # experiments/, grid table
    python tools/summarize_experiments.py experiments --match 'exp3_*' --format markdown
    python tools/summarize_experiments.py --format csv -o results.csv

A run is experiments/<name>/ (its metrics.jsonl, training.log and config.json) or experiments/<name>.log.
The gap is final val loss minus final train loss; the verdict uses the seeds' bands.
"""
import argparse
import csv
import fnmatch
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from errors import UserError, run_main  # noqa: E402
from runlog import read_run  # noqa: E402

HEADERS = ["Experiment", "Train Loss", "Val Loss", "Gap", "Time", "Best Val", "Best Step", "Params", "Tokens/s", "Verdict"]
BANDS = [(0.1, "healthy"), (0.3, "slight overfitting"), (0.5, "moderate overfitting")]  # seeds ch04 2.3


def overfitting_verdict(gap):
    """The seeds' bands on val - train: < 0.1 healthy, < 0.3 slight, < 0.5 moderate, else severe."""
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
            f"{run.num_params / 1e6:.2f}M" if run.num_params else "N/A", f"{rate:,.0f}" if rate else "N/A",
            overfitting_verdict(val - train)]


def format_table(rows, fmt):
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out).writerows([HEADERS, *rows])
        return out.getvalue()
    return tabulate(rows, headers=HEADERS, tablefmt={"grid": "grid", "markdown": "github"}[fmt], disable_numparse=True)


def main(argv):
    parser = argparse.ArgumentParser(description="One table of all runs in an experiments directory.")
    parser.add_argument("exp_dir", nargs="?", default="experiments", help="directory of runs (default experiments)")
    parser.add_argument("--format", choices=["grid", "markdown", "csv"], default="grid")
    parser.add_argument("--match", default="*", help="only runs whose name matches this glob, e.g. 'exp1_*'")
    parser.add_argument("-o", "--output", help="write the table to this file instead of printing it")
    args = parser.parse_args(argv)
    runs = find_runs(args.exp_dir, args.match)
    if not runs:
        raise UserError(f"no runs with logs in {args.exp_dir} (matching '{args.match}'): each run needs "
                        f"NAME/training.log, NAME/metrics.jsonl or NAME.log")
    table = format_table([summary_row(r) for r in runs], args.format)
    if args.output:
        Path(args.output).write_text(table + ("" if table.endswith("\n") else "\n"), encoding="utf-8")
        print(f"summary of {len(runs)} runs written to {args.output}")
    elif args.format == "grid":
        print("=" * 80 + "\nExperiment summary\n" + "=" * 80)
        print(table)
    else:
        print(table, end="" if table.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
