"""The tutorial's ch03 debugging script as a tool: a tiny GPT, one forward and backward pass on random tokens,
and a table of every parameter's gradient mean, std and max |gradient|.

    python tools/debug_training.py [--n_layer=2 --n_head=2 --n_embd=64 --block_size=16 --vocab_size=65 --batch_size=4]
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch
from tabulate import tabulate

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from model import GPT, GPTConfig


def gradient_table(model, X, Y):
    """(loss, rows of [name, mean, std, max |grad|]) after one backward pass."""
    _, loss = model(X, Y)
    loss.backward()
    rows = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            rows.append([name, g.mean().item(), g.std().item() if g.numel() > 1 else 0.0, g.abs().max().item()])
    return loss.item(), rows


def main(argv):
    parser = tool_parser(__file__, __doc__)
    for key, default in (("n_layer", 2), ("n_head", 2), ("n_embd", 64), ("block_size", 16), ("vocab_size", 65),
                         ("batch_size", 4), ("seed", 0)):
        parser.add_argument(f"--{key}", type=int, default=default)
    args, _ = parser.parse(argv)
    if args.n_embd % args.n_head:
        raise UserError(f"n_embd={args.n_embd} is not divisible by n_head={args.n_head}")
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size))
    X = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    Y = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    loss, rows = gradient_table(model, X, Y)
    print(f"Loss: {loss:.4f} (random guessing: ln({args.vocab_size}) = {math.log(args.vocab_size):.4f})")
    print("\nParameter gradients:")
    print(tabulate(rows, headers=["parameter", "mean", "std", "max |grad|"], floatfmt=("", "+.6f", ".6f", ".6f")))
    dead = [r[0] for r in rows if r[3] == 0.0]
    if dead:
        print(f"\nWARNING: {len(dead)} parameter(s) got no gradient at all: {', '.join(dead)}")
    return 0


if __name__ == "__main__":
    run_main(main)
