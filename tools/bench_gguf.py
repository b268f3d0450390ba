"""llama.cpp against sample.py on the same trained model: the GGUF file's size in each dtype and generation speed.

    python tools/bench_gguf.py --out_dir=out-shakespeare-char-fast [--max_new_tokens=500] [--rounds=3] [--threads=N]

Each dtype (f32, f16, q8_0) is exported to a temporary file and run by llama.cpp (llama-cpp-python: pip install -r
requirements-gguf.txt, which compiles llama.cpp from source) generating
--max_new_tokens tokens from one newline at temperature 0.8 (top_k 200, as sample.py's defaults), timed from the first
token to the last, alternated with our generate() on the same prompt (the KV cache on, dtype=auto). Tokens/s are
medians over --rounds rounds; every run uses --threads threads (default: every core).
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit.core import hardware
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, import_optional, run_main
from gpt_toolkit.core.hardware import cpu_name
from gpt_toolkit.models.checkpoint import BEST
from gpt_toolkit.models.gguf_export import DTYPES, write_gguf
from gpt_toolkit.models.source import ModelSource, load_model


def import_llama_cpp():
    return import_optional("llama_cpp", "tools/bench_gguf.py", package="llama.cpp's Python binding (llama_cpp)",
                           install="pip install -r requirements-gguf.txt (it compiles llama.cpp from source: a C++ "
                                   "compiler and 8 CPU-minutes, once)")


def time_ours(model, ids, n, ctx):
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad(), ctx:
        model.generate(torch.tensor([ids]), n, temperature=0.8, top_k=200)
    return n / (time.perf_counter() - start)


def time_llama(llm, ids, n):
    llm.reset()
    start = time.perf_counter()
    made = 0
    for _ in llm.generate(ids, temp=0.8, top_k=200, repeat_penalty=1.0, reset=True):
        made += 1
        if made == n:
            break
    return made / (time.perf_counter() - start)


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--checkpoint", default=BEST)
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args, _ = parser.parse(argv)
    llama_cpp = import_llama_cpp()
    if min(args.max_new_tokens, args.rounds, args.threads) <= 0:
        raise UserError("--max_new_tokens, --rounds and --threads must be positive")
    model, tokenizer = load_model(ModelSource.run(args.out_dir), "cpu", checkpoint=args.checkpoint)
    n = min(args.max_new_tokens, model.config.block_size - 1)
    torch.set_num_threads(args.threads)
    dtype = hardware.resolve_dtype("auto", "cpu")
    ctx = hardware.autocast("cpu", dtype)
    ids = tokenizer.encode("\n")
    results = {f"sample.py ({dtype})": []}
    with tempfile.TemporaryDirectory(prefix="gpt-toolkit-bench-gguf-") as tmp:
        llms, sizes = {}, {}
        for d in DTYPES:
            path = Path(tmp) / f"model-{d}.gguf"
            try:
                sizes[d] = write_gguf(model, tokenizer, path, dtype=d)
            except UserError as e:
                print(f"{d}: {e}")
                continue
            llms[d] = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.block_size, n_threads=args.threads,
                                      verbose=False)
            results[f"llama.cpp {d}"] = []
        for _ in range(args.rounds):
            results[f"sample.py ({dtype})"].append(time_ours(model, ids, n, ctx))
            for d, llm in llms.items():
                results[f"llama.cpp {d}"].append(time_llama(llm, ids, n))
    print(f"{args.out_dir} ({model.get_num_params() / 1e6:.2f}M parameters), {n} tokens per sample, {args.threads} "
          f"thread(s), {cpu_name()}; medians of {args.rounds} rounds:")
    for name, values in results.items():
        size = sizes.get(name.rsplit(" ", 1)[-1])
        shown = f"   file {size / 2**20:6.2f} MB" if size else ""
        print(f"  {name:22s} {statistics.median(values):9.0f} tokens/s{shown}")
    return 0


if __name__ == "__main__":
    run_main(main)
