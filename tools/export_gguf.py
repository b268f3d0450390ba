"""Export a trained model as a GGUF file for llama.cpp, ollama and LM Studio.

    python tools/export_gguf.py --out_dir=out-shakespeare-char-fast --to=shakespeare.gguf [--dtype=f16|f32|q8_0]
    python tools/export_gguf.py --out_dir=hf-shakespeare --to=shakespeare.gguf          # a transformers directory

The file holds llama.cpp's GPT-2 architecture and the tokenizer (GPT-2's, an own BPE, or a character vocabulary),
with a chat model's tokens and template. llama.cpp runs the model's own context only (block_size tokens, prompt and
generation together): GPT-2's learned positions end there, and llama.cpp does not slide a window as sample.py does.
Matrices are stored in --dtype (default f16; q8_0: 8-bit blocks, about half of f16's size), norms and biases in
float32. A LoRA run exports with its adapters merged in. The file is written beside --to and renamed into place once
whole.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.models.checkpoint import BEST
from gpt_toolkit.models.gguf_export import DTYPES, write_gguf
from gpt_toolkit.models.source import ModelSource


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--out_dir", required=True, help="the trained run's directory, or a transformers directory")
    parser.add_argument("--to", required=True, help="the .gguf file to write (must not exist)")
    parser.add_argument("--dtype", default="f16", choices=DTYPES, help="how the matrices are stored (default f16)")
    parser.add_argument("--checkpoint", default=BEST, help=f"file in out_dir (default {BEST}, the lowest val loss)")
    parser.add_flag("--verify_checkpoint", default=True, help="check the checkpoint's checksum")
    args, _ = parser.parse(argv)
    to = Path(args.to)
    if to.exists() or to.is_symlink():
        raise UserError(f"--to={to} already exists: choose a new file name (nothing is overwritten)")
    if not to.parent.is_dir():
        raise UserError(f"--to={to}: the directory {to.parent} does not exist; create it or choose another place")
    source = ModelSource.at(args.out_dir)  # a run's directory (--checkpoint in it), or a transformers directory
    ckpt, path = source.load_checkpoint(args.checkpoint, verify=args.verify_checkpoint)
    model, tokenizer = source.model(ckpt), source.tokenizer(ckpt)
    size = write_gguf(model.eval(), tokenizer, to, dtype=args.dtype, name=Path(args.out_dir).name)
    print(f"exported {path or source} ({tokenizer.kind} tokenizer, {args.dtype}) to {to}: {size / 2**20:.1f} MB")
    block = model.config.block_size
    print(f"run it with llama.cpp: llama-cli -m {to} -c {block} -n {block // 2} -p 'ROMEO:' (its context is {block} "
          f"tokens: keep the prompt and -n inside it, GPT-2's learned positions end there), or see the README for ollama")
    return 0


if __name__ == "__main__":
    run_main(main)
