"""Loss and perplexity of a trained model over every token of a split (not the 20-batch sample in the training log,
which moves by +-0.03 with the rows it happens to draw): the figure to compare models by.

    python tools/evaluate.py --out_dir=out-shakespeare-char [--checkpoint=ckpt.pt] [--split=val] [--dataset=NAME]

The split is read in non-overlapping windows of the model's block_size (the last one shorter); each token is
predicted once, from the tokens before it in its window. Works for this toolkit's checkpoints and nanoGPT's.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from tqdm import tqdm

from gpt_toolkit import hardware
from gpt_toolkit.checkpoint import BEST, load_checkpoint, run_checkpoint
from gpt_toolkit.cli import tool_parser
from gpt_toolkit.dataset import SPLITS
from gpt_toolkit.errors import UserError, run_main
from gpt_toolkit.evaluation import checkpoint_split, score_line


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--out_dir", required=True, help="the trained run's directory")
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
    ckpt = load_checkpoint(run_checkpoint(args.out_dir, args.checkpoint), verify=args.verify_checkpoint)
    device = hardware.resolve_device(args.device)
    dtype = hardware.resolve_dtype(args.dtype, device)
    scoring = checkpoint_split(ckpt, split=args.split, dataset=args.dataset, data_dir=args.data_dir)
    with tqdm(total=len(scoring.data) - 1, unit="tok", unit_scale=True, desc=f"{scoring.name} {args.split}",
              mininterval=0.5, file=sys.stderr) as bar:
        score = scoring.score(batch_size=args.batch_size, device=device, ctx=hardware.autocast(device, dtype),
                              progress=bar.update)
    print(score_line(args.split, score) + (" (the assistant's tokens)" if scoring.trained is not None else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
