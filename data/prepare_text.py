"""Turn any UTF-8 text file into a dataset that train.py trains on with --dataset=NAME.

    python data/prepare_text.py --input=notes.txt --name=notes                    # characters (like shakespeare_char)
    python data/prepare_text.py --input=notes.txt --name=notes --tokenizer=gpt2   # GPT-2 BPE (like shakespeare)
    python train.py config/train_shakespeare_char.py --dataset=notes
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the toolkit root, for dataset.py

from dataset import build_dataset, read_text  # noqa: E402
from errors import run_main  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the UTF-8 text file")
    parser.add_argument("--name", required=True, help="dataset name: files go to data/NAME/")
    parser.add_argument("--tokenizer", choices=["char", "gpt2"], default="char", help="char (default) or gpt2 BPE")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction kept for validation (default 0.1)")
    parser.add_argument("--data_dir", default=str(HERE), help="where dataset directories live (default: this data/ dir)")
    args = parser.parse_args(argv)
    text = read_text(args.input)
    out_dir = Path(args.data_dir) / args.name
    summary = build_dataset(text, out_dir, args.tokenizer, args.val_fraction)
    print(f"{args.tokenizer} vocab size {summary['vocab_size']:,}; "
          f"train {summary['train']:,} tokens, val {summary['val']:,} tokens")
    print(f"wrote {out_dir}: train with  python train.py config/train_shakespeare_char.py --dataset={args.name}")
    return 0


if __name__ == "__main__":
    run_main(main)
