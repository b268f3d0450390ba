"""Turn conversations into a chat dataset for fine-tuning: JSON Lines of {"messages": [{"role": "system"|"user"|
"assistant", "content": "..."}]} or {"prompt": "...", "completion": "..."}, rendered with the chat template
(gpt_toolkit/data/chat.py) and stored with which targets are trained (the assistant's tokens and their <|end|>).

    python data/prepare_chat.py --input=chats.jsonl --name=mychat --tokenizer_from=out-shakespeare-char  # a run's
    python data/prepare_chat.py --input=chats.jsonl --name=mychat --tokenizer=gpt2                       # GPT-2's
    python data/prepare_chat.py --input=chats.jsonl --name=mychat --tokenizer=bpe --vocab_size=2048      # a new BPE
    python train.py config/finetune_chat_shakespeare.py --dataset=mychat

--tokenizer_from takes the tokenizer of the model to fine-tune: a run's out_dir, an exported transformers directory,
or a dataset directory (data/NAME). The last conversations (--val_fraction) are val.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the toolkit root, for the library modules

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.data.chat import prepare_chat_dataset, read_conversations
from gpt_toolkit.data.preparing import TokenizerChoice


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--input", required=True, help="a JSON Lines file of conversations")
    parser.add_argument("--name", required=True, help="dataset name: files go to data/NAME/")
    parser.add_argument("--tokenizer_from", help="the tokenizer of the model to fine-tune: its out_dir, an exported "
                        "transformers directory, or a dataset directory")
    parser.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"], help="a vocabulary for a model trained from "
                        "scratch, built as data/prepare_text.py builds it")
    parser.add_argument("--vocab_size", type=int, help="--tokenizer=bpe: the ids to learn")
    parser.add_argument("--block_size", type=int, help="the longest conversation, in tokens (default: the model's "
                        "block_size with --tokenizer_from=OUT_DIR, else 1024)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="conversations kept for validation (default 0.1)")
    parser.add_flag("--skip_bad", help="skip (and count) bad lines instead of stopping at the first")
    parser.add_argument("--data_dir", default=str(HERE), help="where dataset directories live (default: this data/ dir)")
    args, _ = parser.parse(argv)
    if bool(args.tokenizer) == bool(args.tokenizer_from):
        raise UserError("give the tokenizer: --tokenizer_from=OUT_DIR (the model to fine-tune) or --tokenizer=char|gpt2|bpe "
                        "(a new model)")
    if args.block_size is not None and args.block_size < 1:
        raise UserError(f"--block_size={args.block_size} must be a positive number of tokens (the longest conversation)")
    if not args.name or args.name in (".", "..") or any(sep in args.name for sep in "/\\") or args.name.startswith("."):
        raise UserError(f"--name={args.name!r} must be a plain directory name (the dataset goes to data/NAME/)")
    conversations, skipped = read_conversations(args.input, skip_bad=args.skip_bad)
    tokenizer = TokenizerChoice(args.tokenizer, vocab_size=args.vocab_size, of_model=args.tokenizer_from)
    summary = prepare_chat_dataset(conversations, Path(args.data_dir) / args.name, tokenizer, block_size=args.block_size,
                                   val_fraction=args.val_fraction, skip_bad=args.skip_bad, skipped=skipped)
    if summary["skipped"]:
        print(f"skipped {sum(summary['skipped'].values())} bad line(s): " + ", ".join(
            f"{n} {reason}" for reason, n in sorted(summary["skipped"].items())))
    print(f"{summary['conversations']:,} conversations ({summary['train_conversations']:,} train, "
          f"{summary['val_conversations']:,} val); {summary['tokens']:,} tokens, {summary['trained']:,} of them trained "
          f"(the assistant's); vocab size {summary['vocab_size']:,} ({summary['tokenizer']} and the chat tokens)")
    if args.tokenizer_from:
        print(f"wrote {Path(args.data_dir) / args.name}: fine-tune with  python train.py config/finetune_chat_shakespeare.py"
              f" --dataset={args.name} --init_from={args.tokenizer_from}")
    else:  # a new vocabulary: a model trained on it from scratch
        print(f"wrote {Path(args.data_dir) / args.name}: train with  python train.py --dataset={args.name} --padding=True "
              f"--block_size={summary['block_size']}")
    return 0


if __name__ == "__main__":
    run_main(main)
