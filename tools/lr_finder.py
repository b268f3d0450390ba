"""Learning-rate range test (Leslie Smith, https://arxiv.org/abs/1506.01186): train a fresh model for a few hundred
steps while the learning rate grows exponentially, smooth the loss, stop when it diverges, and suggest a rate.

    python tools/lr_finder.py config/train_shakespeare_char_cpu.py [--key=value ...] [--steps=200] [-o lr_finder.png]

Suggested learning_rate: a tenth of the rate at the lowest smoothed loss (past that point the loss is about to blow up).
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.errors import quiet_interrupts

quiet_interrupts()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit import hardware
from gpt_toolkit.cli import tool_parser
from gpt_toolkit.dataset import Dataset, run_batches
from gpt_toolkit.errors import ConfigError, run_main
from gpt_toolkit.plots import save_figure, subplots
from gpt_toolkit.process import setup_process
from gpt_toolkit.trainer import build_model, build_training, train_step


def parser():
    p = tool_parser(__file__, __doc__, training_config=True)
    p.add_argument("--steps", type=int, default=200, help="steps of the sweep (default 200)")
    p.add_argument("--lr_start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--lr_end", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--smoothing", type=float, default=0.0, help="EMA factor of the loss (default: a window of steps/20)")
    p.add_argument("-o", "--output", default="lr_finder.png", help="the plot (default lr_finder.png)")
    return p


def range_test(cfg, steps, lr_start, lr_end, smoothing=0.0, report=print):
    """[(lr, loss, smoothed loss)] for an exponential sweep from lr_start to lr_end, stopping on divergence.
    smoothing is the EMA factor; 0 picks one whose window is 1/20 of the sweep (0.98 for 1000 steps), so the
    smoothed curve does not lag decades of learning rate behind a short sweep."""
    if not smoothing:
        smoothing = 1 - 20 / max(steps, 40)
    device = hardware.resolve_device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    dataset.check_block_size(cfg.block_size)
    cfg.init_from = "scratch"
    torch.manual_seed(cfg.seed)
    model, model_args, _ = build_model(cfg, dataset, None)
    training = build_training(model, cfg, device=device, dtype=dtype, learning_rate=lr_start)
    history, avg, best = [], 0.0, float("inf")
    for step in range(steps):
        lr = lr_start * (lr_end / lr_start) ** (step / max(1, steps - 1))
        for group in training.optimizer.param_groups:
            group["lr"] = lr
        batches = run_batches(cfg, dataset, step, device, vocab_size=model_args["vocab_size"])
        loss = train_step(training, batches, cfg.grad_clip).item()
        if not math.isfinite(loss):
            report(f"step {step}: loss is not finite at lr {lr:.2e}: stopping")
            break
        avg = smoothing * avg + (1 - smoothing) * loss
        smoothed = avg / (1 - smoothing ** (step + 1))  # bias-corrected running mean
        history.append((lr, loss, smoothed))
        best = min(best, smoothed)
        if step > 10 and smoothed > 4 * best:
            report(f"step {step}: smoothed loss {smoothed:.3f} is over 4x its best ({best:.3f}) at lr {lr:.2e}: diverged")
            break
    return history


def suggest(history):
    """(suggested rate, rate at the lowest smoothed loss)."""
    lr_min = min(history, key=lambda h: h[2])[0]
    return lr_min / 10, lr_min


def main(argv):
    args, cfg = parser().parse(argv)
    if args.steps < 20 or not 0 < args.lr_start < args.lr_end:
        raise ConfigError("need --steps >= 20 and 0 < --lr_start < --lr_end")
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
