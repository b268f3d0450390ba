"""Loss and perplexity of a trained model over every token of a split (not the 20-batch sample in the training log,
which moves by +-0.03 with the rows it happens to draw): the figure to compare models by. Or its scores on standard
tasks, as lm-evaluation-harness scores them.

    python tools/evaluate.py --out_dir=out-shakespeare-char [--checkpoint=ckpt.pt] [--split=val] [--dataset=NAME]
    python tools/evaluate.py --out_dir=out-shakespeare-char --tasks=hellaswag,arc_easy,piqa,lambada [--tasks_limit=500]
    python tools/evaluate.py --init_from=gpt2 --tasks=hellaswag        # OpenAI's weights, or a transformers directory
    python tools/evaluate.py --out_dir=OUT --task_file=my_task.jsonl   # your own task (docs/evaluation.md)

The split is read in non-overlapping windows of the model's block_size (the last one shorter); each token is
predicted once, from the tokens before it in its window. Works for this toolkit's checkpoints and nanoGPT's.
Tasks download on first use into --tasks_dir (default ~/.cache/gpt-toolkit/tasks); each prints acc (and acc_norm,
or perplexity), and a CORE-style line averages them centered on chance.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback


from tqdm import tqdm

from gpt_toolkit.core import hardware
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.data.dataset import SPLITS
from gpt_toolkit.models.checkpoint import BEST, load_checkpoint, run_checkpoint
from gpt_toolkit.models.source import RESUME, ModelSource, load_model
from gpt_toolkit.serving.task_scoring import core_line, load_tasks, score_task
from gpt_toolkit.training.evaluation import checkpoint_split, score_line


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--out_dir", help="the trained run's directory")
    parser.add_argument("--init_from", default="resume", help="resume (out_dir's checkpoint), gpt2* or a transformers "
                        "directory (tasks only)")
    parser.add_argument("--tasks", default="", help="tasks to score, comma-separated: hellaswag, arc_easy, piqa, "
                        "lambada, or task files")
    parser.add_argument("--task_file", action="append", default=[], help="a task file of your own (JSON Lines, "
                        "docs/evaluation.md); repeatable")
    parser.add_argument("--tasks_limit", type=int, default=0, help="score only each task's first N items (default all)")
    parser.add_argument("--tasks_dir", help="where downloaded tasks are kept (default ~/.cache/gpt-toolkit/tasks)")
    parser.add_flag("--shared_context", default=True, help="score an item's context once for all its choices")
    parser.add_flag("--verify_checkpoint", default=True, help="check the checkpoint's checksum")
    parser.add_argument("--checkpoint", default=BEST, help=f"file in out_dir (default {BEST}, the lowest val loss)")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--dataset", help="dataset name (default: the one the checkpoint was trained on)")
    parser.add_argument("--data_dir", help="directory holding the datasets (default: the checkpoint's, else data)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=hardware.DTYPE_CHOICES)
    args, _ = parser.parse(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch_size={args.batch_size} must be positive")
    if args.tasks or args.task_file:
        return evaluate_tasks(args)
    if not args.out_dir:
        raise UserError("give the run to evaluate: --out_dir=OUT_DIR (or --tasks=... with --init_from=gpt2)")
    ckpt = load_checkpoint(run_checkpoint(args.out_dir, args.checkpoint), verify=args.verify_checkpoint, optimizer=False)
    device = hardware.resolve_device(args.device)
    dtype = hardware.resolve_dtype(args.dtype, device)
    scoring = checkpoint_split(ckpt, split=args.split, dataset=args.dataset, data_dir=args.data_dir)
    with tqdm(total=len(scoring.data) - 1, unit="tok", unit_scale=True, desc=f"{scoring.name} {args.split}",
              mininterval=0.5, file=sys.stderr) as bar:
        score = scoring.score(batch_size=args.batch_size, device=device, ctx=hardware.autocast(device, dtype),
                              progress=bar.update)
    print(score_line(args.split, score) + (" (the assistant's tokens)" if scoring.trained is not None else ""))
    return 0


def evaluate_tasks(args):
    """Each task's scores (one line each) and the CORE-style line."""
    if args.tasks_limit < 0:
        raise UserError(f"--tasks_limit={args.tasks_limit} must be 0 (every item) or a number of items")
    source = ModelSource.parse(args.init_from, out_dir=args.out_dir or "", allowed=(RESUME,))  # or another run's dir
    if source.resumes and not args.out_dir:
        raise UserError("give the model: --out_dir=OUT_DIR (a trained run), or --init_from=gpt2 or a transformers directory")
    tasks = load_tasks(",".join([args.tasks, *args.task_file]), limit=args.tasks_limit or None, cache_dir=args.tasks_dir)
    device = hardware.resolve_device(args.device)
    dtype = hardware.resolve_dtype(args.dtype, device)
    model, tokenizer = load_model(source, device, checkpoint=args.checkpoint, verify=args.verify_checkpoint, dtype=dtype)
    scores = []
    for task in tasks:
        scores.append(score_task(model, tokenizer, task, device=device, ctx=hardware.autocast(device, dtype),
                                 batch_size=args.batch_size, shared=args.shared_context))
        print(scores[-1].line(), flush=True)
    print(core_line(scores))
    return 0


if __name__ == "__main__":
    run_main(main)
