"""Learning-rate range test (Leslie Smith, https://arxiv.org/abs/1506.01186): train a fresh model for a few hundred
steps while the learning rate grows exponentially, smooth the loss, stop when it diverges, and suggest a rate.

    python tools/lr_finder.py config/train_shakespeare_char_cpu.py [--key=value ...] [--steps=200] [-o lr_finder.png]

Suggested learning_rate: a tenth of the rate at the lowest smoothed loss (past that point the loss is about to blow up).
"""
import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core import hardware
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import ConfigError, UserError, run_main
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.reports.plots import check_plot_output, save_figure, subplots
from gpt_toolkit.training.timing import StepClock, train_in_process
from train import main as train_main  # the entry point: its loop, with the sweep among its guards


def parser():
    p = tool_parser(__file__, __doc__, training_config=True)
    p.add_argument("--steps", type=int, default=200, help="steps of the sweep (default 200)")
    p.add_argument("--lr_start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--lr_end", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--smoothing", type=float, default=0.0, help="EMA factor of the loss (default: a window of steps/20)")
    p.add_argument("-o", "--output", default="lr_finder.png", help="the plot (default lr_finder.png)")
    return p


def range_test(cfg, steps, lr_start, lr_end, smoothing=0.0, report=print):
    """[(lr, loss, smoothed loss)] for an exponential sweep from lr_start to lr_end (train.py with
    --lr_schedule=exponential on a fresh model), stopping on divergence. smoothing is the EMA factor; 0 picks one
    whose window is 1/20 of the sweep (0.98 for 1000 steps), so the smoothed curve does not lag decades of learning
    rate behind a short sweep."""
    if not smoothing:
        smoothing = 1 - 20 / max(steps, 40)
    history = []

    class Sweep(StepClock):
        avg, best = 0.0, float("inf")

        def stop(self, step, loss):
            lr = self.lrs[-1]
            if not math.isfinite(loss):
                report(f"step {step - 1}: loss is not finite at lr {lr:.2e}: stopping")
                return True
            self.avg = smoothing * self.avg + (1 - smoothing) * loss
            smoothed = self.avg / (1 - smoothing ** step)  # bias-corrected running mean
            history.append((lr, loss, smoothed))
            self.best = min(self.best, smoothed)
            if step > 11 and smoothed > 4 * self.best:
                report(f"step {step - 1}: smoothed loss {smoothed:.3f} is over 4x its best ({self.best:.3f}) at lr "
                       f"{lr:.2e}: diverged")
                return True
            return False
    sweep = dataclasses.replace(cfg, lr_schedule="exponential", min_lr=lr_start, learning_rate=lr_end, warmup_iters=0,
                                max_iters=steps)
    train_in_process(train_main, sweep, steps=steps, clock=Sweep())
    if not history:
        raise UserError(f"the loss was not finite from the first step, at lr {lr_start:.2e}: lower --lr_start")
    return history


def suggest(history):
    """(suggested rate, rate at the lowest smoothed loss)."""
    lr_min = min(history, key=lambda h: h[2])[0]
    return lr_min / 10, lr_min


def main(argv):
    args, cfg = parser().parse(argv)
    if args.steps < 20 or not 0 < args.lr_start < args.lr_end:
        raise ConfigError("need --steps >= 20 and 0 < --lr_start < --lr_end")
    check_plot_output(args.output)  # before the range test's training, not after it
    setup_process(hardware.resolve_device(cfg.device), keep_cpu_memory=cfg.keep_cpu_memory)
    print(f"range test: {args.steps} steps, learning rate {args.lr_start:.0e} -> {args.lr_end:.0e}")
    history = range_test(cfg, args.steps, args.lr_start, args.lr_end, args.smoothing)
    suggested, lr_min = suggest(history)
    output = args.output
    fig, ax = subplots(figsize=(10, 5))
    lrs = [h[0] for h in history]
    ax.plot(lrs, [h[1] for h in history], alpha=0.3, label="loss")
    ax.plot(lrs, [h[2] for h in history], linewidth=2, label="smoothed loss")
    ax.axvline(suggested, color="C2", linestyle="--", label=f"suggested {suggested:.1e}")
    ax.axvline(lr_min, color="C3", linestyle=":", label=f"lowest loss {lr_min:.1e}")
    ax.set(xscale="log", xlabel="Learning Rate", ylabel="Loss", title="Learning-rate range test")
    ax.legend()
    ax.grid(True, alpha=0.3)
    save_figure(fig, output)
    print(f"lowest smoothed loss {min(h[2] for h in history):.4f} at learning rate {lr_min:.2e}")
    print(f"suggested learning_rate: {suggested:.2e} (a tenth of that)")
    print(f"plot saved to {output}")
    return 0


if __name__ == "__main__":
    run_main(main)
