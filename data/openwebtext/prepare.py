"""OpenWebText with GPT-2 BPE for config/train_gpt2.py, as nanoGPT prepares it: each document's tokens
followed by <|endoftext|> (50256), 0.05% of documents held out for val.

Needs the Hugging Face `datasets` package (pip install datasets), ~54 GB of downloads and ~17 GB for
train.bin (~9B tokens) and val.bin (~4M tokens).
    python data/openwebtext/prepare.py [--num_proc=8]
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the toolkit root

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import numpy as np

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import import_optional, run_main
from gpt_toolkit.core.files import atomic_write_text
from gpt_toolkit.core.tokenizer import GPT2_EOT as EOT
from gpt_toolkit.core.tokenizer import GPT2_VOCAB_SIZE, GPT2Tokenizer
from gpt_toolkit.data.preparing import write_token_stream


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tokenizer processes")
    parser.add_argument("--out_dir", default=str(HERE), help="where train.bin and val.bin go (default: beside this script)")
    args, _ = parser.parse(argv)
    datasets = import_optional("datasets", "data/openwebtext/prepare.py")
    from tqdm import tqdm

    corpus = datasets.load_dataset("openwebtext", num_proc=args.num_proc)
    split = corpus["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")
    enc = GPT2Tokenizer()

    def tokenize(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(EOT)
        return {"ids": ids}

    tokenized = split.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=args.num_proc)
    out_dir = Path(args.out_dir)
    for name, dset in tokenized.items():
        shards = 1024 if len(dset) > 1024 else 1
        chunks = (np.concatenate(dset.shard(shards, i, contiguous=True).with_format("numpy")["ids"])
                  for i in tqdm(range(shards), desc=f"writing {name}.bin"))
        total = write_token_stream(chunks, out_dir / f"{name}.bin")
        print(f"{name}.bin: {total:,} tokens")
    atomic_write_text(out_dir / "meta.json", json.dumps({"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": EOT}))
    return 0


if __name__ == "__main__":
    run_main(main)
