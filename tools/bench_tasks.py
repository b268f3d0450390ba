"""How fast task scoring runs: items per second on a multiple-choice task, the shared context scored once per item
against one row per choice, rounds alternated, for a GPT-2-124M-shaped model (random weights, GPT-2's tokenizer) and
for a trained run.

    python tools/bench_tasks.py [--out_dir=out-shakespeare-char-fast] [--items=64] [--rounds=3] [--task_file=FILE]

The task is --task_file, or by default `items` four-choice items made from tiny-shakespeare's lines (a context of a
line's start, the true end and three others'), the shape of HellaSwag's. Figures: docs/evaluation.md.
"""
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit.core import hardware
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.core.tokenizer import read_text, tokenizer_from_meta
from gpt_toolkit.data.tasks import Item, Task, read_task_file
from gpt_toolkit.models.checkpoint import BEST
from gpt_toolkit.models.source import ModelSource, load_model
from gpt_toolkit.serving.task_scoring import score_task
from model import GPT, GPT2_SIZES, GPTConfig


def parser():
    p = tool_parser(__file__, __doc__)
    p.add_argument("--out_dir", default="out-shakespeare-char-fast", help="a trained run to time too ('' : none)")
    p.add_argument("--items", type=int, default=64, help="items of the made-up task (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, shared and unshared alternated (default 3)")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--task_file", help="a task file to time instead of the made-up task")
    return p


def shakespeare_task(n, seed=0):
    text = read_text(ROOT / "data" / "shakespeare_char" / "input.txt")
    lines = [line for line in text.split("\n") if 40 <= len(line) <= 70 and line.count(" ") >= 4]
    rng, items = random.Random(seed), []
    ends = lambda line: " " + " ".join(line.split(" ")[-3:])
    for _ in range(n):
        line = rng.choice(lines)
        choices = [ends(line)] + [ends(rng.choice(lines)) for _ in range(3)]
        gold = rng.randrange(4)
        choices[0], choices[gold] = choices[gold], choices[0]
        items.append(Item("choice", " ".join(line.split(" ")[:-3]), tuple(choices), gold))
    return Task("shakespeare-endings", tuple(items))


def items_per_second(model, tokenizer, task, shared, batch_size, device):
    ctx = hardware.autocast(device, hardware.resolve_dtype("auto", device))
    score = score_task(model, tokenizer, task, device=device, ctx=ctx, batch_size=batch_size, shared=shared)
    return score.items / score.seconds, score.metrics["acc"]


def main(argv):
    args = parser().parse(argv)[0]
    if args.items < 1 or args.rounds < 1 or args.batch_size < 1:
        raise UserError("--items, --rounds and --batch_size must be positive")
    device = hardware.resolve_device("auto")
    setup_process(device)
    task = read_task_file(args.task_file) if args.task_file else shakespeare_task(args.items)
    models = {"GPT-2 124M shape (random)": (GPT(GPTConfig(**GPT2_SIZES["gpt2"], vocab_size=50304, block_size=1024)),
                                            tokenizer_from_meta(None))}
    if args.out_dir:
        models[args.out_dir] = load_model(ModelSource.run(args.out_dir), device, checkpoint=BEST)
    print(f"{len(task.items)} items of {task.name}, batch {args.batch_size}, {device}, "
          f"{hardware.resolve_dtype('auto', device)}")
    for name, (model, tokenizer) in models.items():
        model = model.to(device).eval()
        rates = {True: [], False: []}
        with torch.no_grad():
            items_per_second(model, tokenizer, Task(task.name, task.items[:4]), True, args.batch_size, device)  # warm
            for _ in range(args.rounds):
                for shared in (True, False):
                    rates[shared].append(items_per_second(model, tokenizer, task, shared, args.batch_size, device)[0])
        a, b = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"{name}: shared context {a:.1f} items/s, one row per choice {b:.1f} items/s ({a / b:.2f}x); rounds "
              f"{', '.join(f'{x:.1f}' for x in rates[True])} / {', '.join(f'{x:.1f}' for x in rates[False])}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
