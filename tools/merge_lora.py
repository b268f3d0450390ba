"""Fold a LoRA run's adapters into its base: a normal run directory whose ckpt.pt holds the whole merged model.

    python tools/merge_lora.py --out_dir=out-lora --to=out-merged [--checkpoint=ckpt.pt]

The new directory is what a full fine-tune would have left (nanoGPT's checkpoint keys, the vocabulary, the run's
config with lora_rank=0): sample.py, tools/evaluate.py, --init_from=out-merged and nanoGPT's own sample.py read it
without the base, which the LoRA run's checkpoints need beside them. The weights only: to train on, start a new run
from it (--init_from=out-merged).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.files import check_new_directory, write_directory
from gpt_toolkit.models.checkpoint import BEST, save_weights
from gpt_toolkit.models.lora import describe
from gpt_toolkit.models.source import ModelSource


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--out_dir", required=True, help="the LoRA run's directory")
    parser.add_argument("--to", required=True, help="the run directory to create (must not exist, or be empty)")
    parser.add_argument("--checkpoint", default=BEST, help=f"file in out_dir (default {BEST}, the lowest val loss)")
    parser.add_flag("--verify_checkpoint", default=True, help="check the checkpoint's checksum")
    args, _ = parser.parse(argv)
    to = Path(args.to)
    check_new_directory(to)
    run = ModelSource.run(args.out_dir)
    ckpt, source = run.load_checkpoint(args.checkpoint, verify=args.verify_checkpoint)
    if ckpt.get("lora") is None:
        raise UserError(f"{source} is not a LoRA run's checkpoint (it was trained without --lora_rank): its weights "
                        f"are whole already; use --init_from={args.out_dir} or copy {source}")
    model = run.model(ckpt)  # the adapters merged in
    config = dict(ckpt.get("config") or {}, lora_rank=0, out_dir=str(to))
    merged_from = {"checkpoint": str(Path(source).resolve()), **ckpt["lora"]}
    write_directory(to, lambda directory: save_weights(
        Path(directory) / BEST, model.state_dict(), model_args=ckpt["model_args"], meta=ckpt.get("meta"),
        config=config, iter_num=ckpt["iter_num"], best_val_loss=ckpt.get("best_val_loss"), merged_from=merged_from,
        after_failure=f"nothing was kept at {to}; free disk space or choose another --to"))
    print(f"merged the adapters of {source} ({describe(ckpt['lora'])}) with their base {ckpt['lora']['base']['path']} "
          f"(left as it was): wrote {to / BEST}")
    print(f"sample it with python sample.py --out_dir={to}, or fine-tune it further with --init_from={to}")
    return 0


if __name__ == "__main__":
    run_main(main)
