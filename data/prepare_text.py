"""Turn your own text into a dataset that train.py trains on with --dataset=NAME: one text file, a directory of text
files (each a document, in sorted order) or a JSON Lines export (.jsonl, the text under --text_field), of any size.

    python data/prepare_text.py --input=notes.txt --name=notes                    # characters (like shakespeare_char)
    python data/prepare_text.py --input=notes.txt --name=notes --tokenizer=gpt2   # GPT-2 BPE (like shakespeare)
    python data/prepare_text.py --input=notes.txt --name=notes --tokenizer=bpe --vocab_size=1024   # a BPE of your own
    python data/prepare_text.py --input=corpus/ --name=corpus --tokenizer=gpt2    # a directory of documents
    python data/prepare_text.py --input=dump.jsonl --name=dump --tokenizer=gpt2 --text_field=content
    python train.py config/train_shakespeare_char.py --dataset=notes

The input is read, tokenized (on every core: --num_proc) and written in chunks, so memory stays bounded; the files of
a dataset of that name are replaced only once the new ones are complete.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the toolkit root, for the library modules

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.data.preparing import BPE_SAMPLE_MB, TokenizerChoice, open_source, prepare_dataset


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--input", required=True, help="a UTF-8 text file, a directory of them, or a .jsonl file")
    parser.add_argument("--name", required=True, help="dataset name: files go to data/NAME/")
    parser.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"], default="char",
                        help="char (default), gpt2 (GPT-2's BPE), or bpe (a byte-level BPE trained on this text)")
    parser.add_argument("--vocab_size", type=int, help="--tokenizer=bpe: the ids to learn (257 to 65,536)")
    parser.add_argument("--bpe_sample_mb", type=float, default=BPE_SAMPLE_MB,
                        help=f"--tokenizer=bpe: train it on at most this much of the train split (default {BPE_SAMPLE_MB})")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction kept for validation (default 0.1)")
    parser.add_argument("--text_field", default="text", help="JSONL: the key holding each document's text (default text)")
    parser.add_argument("--num_proc", type=int, default=0, help="tokenizer processes (default: one per core)")
    parser.add_argument("--data_dir", default=str(HERE), help="where dataset directories live (default: this data/ dir)")
    args, _ = parser.parse(argv)
    if not args.name or args.name in (".", "..") or any(sep in args.name for sep in "/\\") or args.name.startswith("."):
        raise UserError(f"--name={args.name!r} must be a plain directory name (the dataset goes to data/NAME/), e.g. "
                        f"--name=notes")
    if args.num_proc < 0:
        raise UserError(f"--num_proc={args.num_proc} must be positive (or 0 for one per core)")
    source = open_source(args.input, args.text_field)
    out_dir = Path(args.data_dir) / args.name
    tokenizer = TokenizerChoice(args.tokenizer, vocab_size=args.vocab_size, bpe_sample_mb=args.bpe_sample_mb)
    summary = prepare_dataset(source, out_dir, tokenizer, val_fraction=args.val_fraction, num_proc=args.num_proc or None)
    print(f"{args.tokenizer} vocab size {summary['vocab_size']:,}; train {summary['train']:,} tokens, val "
          f"{summary['val']:,} tokens ({(summary['train'] + summary['val']) / source.size:.3f} tokens per byte)")
    where = "" if out_dir.parent.resolve() == Path("data").resolve() else f" --data_dir={out_dir.parent}"
    print(f"wrote {out_dir}: train with  python train.py config/train_shakespeare_char_cpu.py --dataset={args.name}"
          f"{where} --out_dir=out-{args.name}  (sized for a CPU; on a GPU: config/train_shakespeare_char.py)")
    return 0


if __name__ == "__main__":
    run_main(main)
