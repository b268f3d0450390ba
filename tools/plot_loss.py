"""Plot loss curves from training logs (headless: always writes a PNG, never opens a window).

    python tools/plot_loss.py experiments/exp1_baseline.log                    # train + val -> loss_curve.png
    python tools/plot_loss.py compare experiments/exp1_baseline.log experiments/exp1_large_lr.log
    python tools/plot_loss.py compare experiments/exp2_large_batch experiments/exp2_grad_accum -o exp2.png

Inputs may be tee'd logs (NAME.log), training.log files, metrics.jsonl files, or out_dirs.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.reports.plots import plot_compare, plot_single
from gpt_toolkit.reports.summary import fill_title, load_runs


def main(argv):
    parser = tool_parser(__file__, __doc__, usage="plot_loss.py [-o FILE] LOG | plot_loss.py compare [-o FILE] LOG1 LOG2 ...")
    parser.add_argument("inputs", nargs="+", help="logs, metrics.jsonl files or out_dirs (first word 'compare' to compare)")
    parser.add_argument("-o", "--output", help="PNG to write (default loss_curve.png, or comparison.png when comparing); a "
                        "file there is replaced only if it is a plot (a PNG the toolkit or matplotlib wrote)")
    parser.add_argument("--title", help="figure title when comparing; {batch} (batch_size x gradient_accumulation_steps) "
                        "and {KEY} (a config key) become the runs' own values, from their config.json")
    args, _ = parser.parse(argv)
    if args.inputs[0] == "compare":
        if len(args.inputs) < 2:
            raise UserError("compare needs at least one log: plot_loss.py compare LOG1 LOG2 ...")
        runs = load_runs(args.inputs[1:])
        out = plot_compare(runs, args.output or "comparison.png", fill_title(args.title or "Experiment Comparison", runs))
        print(f"comparison plot saved to {out}")
    else:
        if len(args.inputs) > 1:
            raise UserError("several logs given: use 'plot_loss.py compare LOG1 LOG2 ...' to compare them")
        out = plot_single(load_runs(args.inputs)[0], args.output or "loss_curve.png")
        print(f"plot saved to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
