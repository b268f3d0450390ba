"""Gradient pictures from what --grad_monitor_interval recorded (tutorial's challenge 4): a per-layer gradient-norm
heatmap over training, and histograms of log10|gradient| at chosen steps, to spot vanishing or exploding layers.

    python train.py config/train_shakespeare_char_cpu.py --grad_monitor_interval=50
    python tools/grad_viz.py --out_dir=out-shakespeare-char-cpu [--steps 0,1000,1950] [-o grad_viz.png]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import numpy as np

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.reports.plots import save_figure, subplots
from gpt_toolkit.training.diagnostics import HIST_EDGES
from gpt_toolkit.training.runlog import read_metrics


def read_grad_records(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{path} not found: pass the out_dir of a run")
    by_step = {}
    for record in read_metrics(path)[0]:
        if record.get("type") == "grad":
            by_step[record["iter"]] = record  # a resumed run's later record wins
    if not by_step:
        raise UserError(f"no gradient records in {path}: train with --grad_monitor_interval=N first")
    return [by_step[s] for s in sorted(by_step)]


def layer_order(name):
    order = {"wte": (0, 0), "wpe": (0, 1), "ln_f": (2, 0), "lm_head": (2, 1)}
    return order.get(name, (1, int(name.split(".")[1]) if name.startswith("h.") else 0))


def plot(records, steps, output):
    layers = sorted({k for r in records for k in r["layer_norms"]}, key=layer_order)
    grid = np.array([[np.log10(max(r["layer_norms"].get(layer, np.nan), 1e-12)) for r in records] for layer in layers])
    fig, (top, bottom) = subplots(2, 1, figsize=(12, 9), gridspec_kw={"height_ratios": [3, 2]})
    image = top.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    top.set_yticks(range(len(layers)), layers)
    ticks = np.linspace(0, len(records) - 1, min(10, len(records))).astype(int)
    top.set_xticks(ticks, [records[i]["iter"] for i in ticks])
    top.set(xlabel="Step", title="log10 gradient norm per layer")
    fig.colorbar(image, ax=top)
    centers = (HIST_EDGES[:-1] + HIST_EDGES[1:]).numpy() / 2
    by_step = {r["iter"]: r for r in records}
    for step in steps:
        bottom.plot(centers, by_step[step]["hist"], label=f"step {step}")
    bottom.set(xlabel="log10 |gradient|", ylabel="count", yscale="log", title="Gradient histograms")
    bottom.legend()
    bottom.grid(True, alpha=0.3)
    save_figure(fig, output)


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--out_dir", required=True, help="a run trained with --grad_monitor_interval=N")
    parser.add_argument("--steps", help="comma-separated steps for the histograms (default: first, middle, last record)")
    parser.add_argument("-o", "--output", default="grad_viz.png")
    args, _ = parser.parse(argv)
    records = read_grad_records(args.out_dir)
    recorded = [r["iter"] for r in records]
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",")]
        except ValueError:
            raise UserError(f"--steps={args.steps}: give step numbers like 0,500,1000") from None
        missing = [s for s in steps if s not in recorded]
        if missing:
            raise UserError(f"no gradient record at step(s) {missing}: recorded steps are {recorded[0]}..{recorded[-1]} "
                            f"every {recorded[1] - recorded[0] if len(recorded) > 1 else '?'}")
    else:
        steps = sorted({recorded[0], recorded[len(recorded) // 2], recorded[-1]})
    plot(records, steps, args.output)
    print(f"{len(records)} gradient records, {len(records[0]['layer_norms'])} layers; histograms at steps {steps}")
    print(f"plot saved to {args.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
