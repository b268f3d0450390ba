"""Plot loss curves from training logs (headless: always writes a PNG, never opens a window).

    python tools/plot_loss.py experiments/exp1_baseline.log                    # train + val -> loss_curve.png
    python tools/plot_loss.py compare experiments/exp1_baseline.log experiments/exp1_large_lr.log
    python tools/plot_loss.py compare experiments/exp2_large_batch experiments/exp2_grad_accum -o exp2.png

Inputs may be tee'd logs (NAME.log), training.log files, metrics.jsonl files, or out_dirs.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only: works without a display and never blocks
import matplotlib.pyplot as plt  # noqa: E402

from errors import UserError, run_main  # noqa: E402
from runlog import read_run  # noqa: E402


def load_runs(paths):
    runs = []
    for p in paths:
        try:
            runs.append(read_run(p))
        except ValueError as e:
            raise UserError(f"{e}: pass a train.py log, a metrics.jsonl or an out_dir") from None
    return runs


def plot_single(run, output):
    fig, ax = plt.subplots(figsize=(12, 6))
    ax.plot(run.steps, run.train_losses, label="Train Loss", linewidth=2)
    ax.plot(run.steps, run.val_losses, label="Val Loss", linewidth=2)
    ax.set(xlabel="Steps", ylabel="Loss", title=f"Training Progress: {run.name}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _save(fig, output)


def plot_compare(runs, output, title="Experiment Comparison"):
    """Val loss solid and train loss dashed, one colour per run."""
    fig, ax = plt.subplots(figsize=(14, 7))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ax.plot(run.steps, run.val_losses, color=color, linewidth=2, marker="o", markersize=3, label=f"{run.name} (val)")
        ax.plot(run.steps, run.train_losses, color=color, linewidth=1, linestyle="--", alpha=0.7, label=f"{run.name} (train)")
    ax.set(xlabel="Steps", ylabel="Loss", title=title)
    ax.legend(fontsize=9)
    ax.grid(True, alpha=0.3)
    return _save(fig, output)


def _save(fig, output):
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv):
    parser = argparse.ArgumentParser(description="Plot train/val loss curves from train.py logs.",
                                     usage="plot_loss.py [-o FILE] LOG | plot_loss.py compare [-o FILE] LOG1 LOG2 ...")
    parser.add_argument("inputs", nargs="+", help="logs, metrics.jsonl files or out_dirs (first word 'compare' to compare)")
    parser.add_argument("-o", "--output", help="PNG to write (default loss_curve.png, or comparison.png when comparing)")
    parser.add_argument("--title", help="figure title when comparing")
    args = parser.parse_args(argv)
    if args.inputs[0] == "compare":
        if len(args.inputs) < 2:
            raise UserError("compare needs at least one log: plot_loss.py compare LOG1 LOG2 ...")
        out = plot_compare(load_runs(args.inputs[1:]), args.output or "comparison.png", args.title or "Experiment Comparison")
        print(f"comparison plot saved to {out}")
    else:
        if len(args.inputs) > 1:
            raise UserError("several logs given: use 'plot_loss.py compare LOG1 LOG2 ...' to compare them")
        out = plot_single(load_runs(args.inputs)[0], args.output or "loss_curve.png")
        print(f"plot saved to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
