"""Plots, always written as PNG files, each written whole or not at all. Figures are matplotlib Figure objects made
directly, not through pyplot: no window and no GUI backend (they work over SSH), and no pyplot state to set or
clean up."""
import io
from pathlib import Path

from matplotlib.figure import Figure

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import check_output, write_output

SOFTWARE = "gpt-toolkit"  # the PNG's Software text: how a plot this toolkit wrote is known (and may be replaced)


def subplots(*args, figsize, **kwargs):
    """(figure, axes) as pyplot.subplots gives them, on a figure of our own."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def plot_single(run, output):
    """Train and val loss against steps; with --eval_tasks' scores, a panel of them below (each task's centered score
    and the CORE-style mean)."""
    fig, axes = subplots(2 if run.core else 1, 1, figsize=(12, 9 if run.core else 6), squeeze=False)
    ax = axes[0][0]
    point = dict(marker="o") if len(run.steps) == 1 else {}  # one evaluation (a run stopped early): a line draws nothing
    ax.plot(run.steps, run.train_losses, label="Train Loss", linewidth=2, **point)
    ax.plot(run.steps, run.val_losses, label="Val Loss", linewidth=2, **point)
    ax.set(xlabel="Steps", ylabel="Loss", title=f"Training Progress: {run.name}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    if run.core:
        plot_tasks(axes[1][0], [run], each_task=True)
    return save_figure(fig, output)


def plot_tasks(ax, runs, each_task=False):
    """The CORE-style score of each run against steps (and, with each_task, every task's centered score)."""
    for i, run in enumerate(runs):
        steps = sorted(run.core)
        ax.plot(steps, [run.core[s] for s in steps], color=f"C{i % 10}", linewidth=2, marker=MARKERS[i % len(MARKERS)],
                label=f"{run.name} (CORE-style)" if not each_task else "CORE-style")
        if each_task:
            for j, name in enumerate(sorted({t for s in steps for t in run.tasks[s]})):
                have = [s for s in steps if name in run.tasks[s]]
                ax.plot(have, [run.tasks[s][name]["centered"] for s in have], linestyle=DASHES[(j + 1) % len(DASHES)],
                        linewidth=1, label=name)
    ax.set(xlabel="Steps", ylabel="centered score ((acc - random) / (1 - random))", title="Tasks (--eval_tasks)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize=9)
    ax.grid(True, alpha=0.3)


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DASHES = ["-", (0, (6, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)), (0, (3, 3)), (0, (8, 2, 1, 2, 1, 2))]


def plot_compare(runs, output, title="Experiment Comparison", by_time=False):
    """Val loss as thick lines and train loss as thin ones, against steps, or with by_time against the seconds since each
    run started (the evaluations metrics.jsonl timed). Each run has its own colour, marker and dash pattern, and the
    later runs are drawn thinner on top, so curves that overlap still show (four of exp3's once looked like two)."""
    scored = [run for run in runs if run.core]
    fig, axes = subplots(2 if scored else 1, 1, figsize=(14, 11 if scored else 7), squeeze=False)
    ax = axes[0][0]
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
    if scored:
        plot_tasks(axes[1][0], scored)
    return save_figure(fig, output)


def check_plot_output(output):
    """Refuse, before a tool's work, an output save_figure would refuse."""
    check_output(output, ours=is_plot, what="plot", flag="-o")  # first: a file of the user's there is named as such
    if Path(output).suffix.lower() != ".png":  # the bytes are a PNG's, whatever the name says
        raise UserError(f"-o {output}: plots are written as PNG: give a name ending in .png")


def save_figure(fig, output):
    """Write fig as a PNG at output (its directory made if needed). Returns the path. A file there is replaced only
    when it is a plot (a PNG that this toolkit or matplotlib wrote: earlier versions did not mark theirs); a directory,
    anything else there, or a place that cannot be written is a one-line UserError."""
    output = Path(output)
    check_plot_output(output)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, metadata={"Software": SOFTWARE})
    write_output(output, png.getvalue(), ours=is_plot, what="plot", flag="-o")
    return output


def is_plot(head):
    """Whether a file's first bytes are a PNG that this toolkit or matplotlib wrote (their Software text chunk)."""
    return head.startswith(b"\x89PNG\r\n\x1a\n") and (b"tEXtSoftware\x00" + SOFTWARE.encode() in head
                                                        or b"tEXtSoftware\x00Matplotlib" in head)
