"""Plots, always written as PNG files, each written whole or not at all. Figures are matplotlib Figure objects made
directly, not through pyplot: no window and no GUI backend (they work over SSH), and no pyplot state to set or
clean up."""
import io
from pathlib import Path

from matplotlib.figure import Figure

from gpt_toolkit.errors import UserError
from gpt_toolkit.files import atomic_write_bytes


def subplots(*args, figsize, **kwargs):
    """(figure, axes) as pyplot.subplots gives them, on a figure of our own."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def plot_single(run, output):
    fig, ax = subplots(figsize=(12, 6))
    ax.plot(run.steps, run.train_losses, label="Train Loss", linewidth=2)
    ax.plot(run.steps, run.val_losses, label="Val Loss", linewidth=2)
    ax.set(xlabel="Steps", ylabel="Loss", title=f"Training Progress: {run.name}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return save_figure(fig, output)


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DASHES = ["-", (0, (6, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)), (0, (3, 3)), (0, (8, 2, 1, 2, 1, 2))]


def plot_compare(runs, output, title="Experiment Comparison", by_time=False):
    """Val loss as thick lines and train loss as thin ones, against steps, or with by_time against the seconds since each
    run started (the evaluations metrics.jsonl timed). Each run has its own colour, marker and dash pattern, and the
    later runs are drawn thinner on top, so curves that overlap still show (four of exp3's once looked like two)."""
    fig, ax = subplots(figsize=(14, 7))
    for i, run in enumerate(runs):
        style = dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(run.steps) // 12))
        dashes = DASHES[i % len(DASHES)]
        width = max(1.0, 3.5 - 0.6 * i)
        steps = [s for s in run.steps if s in run.elapsed] if by_time else run.steps
        xs = [run.elapsed[s] for s in steps] if by_time else steps
        ax.plot(xs, [run.evals[s][1] for s in steps], linewidth=width, linestyle=dashes, markersize=6, zorder=2 + i,
                label=f"{run.name} (val)", **style)
        ax.plot(xs, [run.evals[s][0] for s in steps], linewidth=width / 2.5, linestyle=dashes, markersize=3,
                alpha=0.6, zorder=2 + i, label=f"{run.name} (train)", **style)
    ax.set(xlabel="Seconds" if by_time else "Steps", ylabel="Loss", title=title)
    ax.legend(fontsize=9)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, output)


def save_figure(fig, output):
    """Write fig as a PNG at output (its directory made if needed). Returns the path. An output that is a directory
    or cannot be written is a one-line UserError."""
    output = Path(output)
    if output.is_dir():
        raise UserError(f"the plot's output {output} is a directory: give a file name, e.g. -o {output / 'plot.png'}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output, png.getvalue())
    except OSError as e:
        raise UserError(f"cannot write the plot to {output} ({e.strerror or e}): choose another -o") from None
    return output
