"""Tiny Shakespeare as a character-level dataset: train.bin/val.bin (uint16, 90/10) and meta.pkl/meta.json here.

    python data/shakespeare_char/prepare.py                  # input.txt beside this file, downloaded if missing
    python data/shakespeare_char/prepare.py --input my.txt   # any UTF-8 text instead
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the toolkit root, for dataset.py

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.errors import run_main
from gpt_toolkit.data.preparing import prepare_main

if __name__ == "__main__":
    run_main(lambda argv: prepare_main(argv, __doc__.splitlines()[0], HERE, tokenizer="char"))
