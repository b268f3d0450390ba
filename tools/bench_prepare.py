"""Benchmark preparing a big corpus: MB/s and peak memory (summed over the process and its workers) of
data/prepare_text.py for char, gpt2 and an own BPE, beside single-thread tiktoken (encode_ordinary) on the same text.
For bpe, also the time its training took on its sample, and the MB/s of the rest (scanning and encoding).

    python tools/bench_prepare.py [--size_mb=100] [--input=FILE] [--num_proc=0] [--tokenizers=char,gpt2,bpe]
        [--vocab_size=4096] [--bpe_sample_mb=100]

Without --input, tiny-shakespeare (data/shakespeare_char/input.txt) is repeated to --size_mb in a temp directory.
Each preparation runs as its own process, as a user runs it; memory is sampled from /proc every 20 ms (Linux).
tiktoken is timed before and after each preparation, which is compared with the mean of the two.
"""
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core import system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.tokenizer import GPT2Tokenizer


def run_measured(cmd):
    """(seconds, peak summed RSS in bytes, stdout) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **system.utf8_pipes())
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], (system.tree_resident_bytes(proc.pid) or 0))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[1:3])} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return time.perf_counter() - t0, peak[0], out


def tiktoken_rate(path, limit=64 << 20):
    """Single-thread tiktoken encode_ordinary MB/s over (up to `limit` bytes of) the text, in 1 MB pieces."""
    enc = GPT2Tokenizer().enc
    with open(path, encoding="utf-8") as f:
        text = f.read(limit)
    size = len(text.encode("utf-8"))
    t0 = time.perf_counter()
    for i in range(0, len(text), 1 << 20):
        enc.encode_ordinary(text[i:i + (1 << 20)])
    return size / (time.perf_counter() - t0) / 1e6


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--size_mb", type=int, default=100, help="size of the generated input (default 100)")
    parser.add_argument("--input", help="a text file to prepare instead of repeated tiny-shakespeare")
    parser.add_argument("--num_proc", type=int, default=0, help="passed to prepare_text.py (0: one per core)")
    parser.add_argument("--tokenizers", default="char,gpt2,bpe")
    parser.add_argument("--vocab_size", type=int, default=4096, help="the BPE's vocabulary (default 4096)")
    parser.add_argument("--bpe_sample_mb", type=float, default=100, help="the BPE's training sample (default 100)")
    args, _ = parser.parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.input:
            path = Path(args.input)
        else:
            seed = ROOT / "data" / "shakespeare_char" / "input.txt"
            if not seed.exists():
                raise UserError(f"{seed} is missing: run python data/shakespeare_char/prepare.py first, or pass --input")
            text = seed.read_bytes()
            path = Path(tmp) / "big.txt"
            with open(path, "wb") as f:
                for _ in range(max(1, args.size_mb * 10**6 // len(text))):
                    f.write(text)
        size = path.stat().st_size
        print(f"input {path.name}: {size / 1e6:,.0f} MB on {os.cpu_count()} cores", flush=True)
        # tiktoken is timed before and after each preparation, and each is compared with the mean of the two
        # around it: this machine's speed drifts by tens of percent within minutes
        rates = [tiktoken_rate(path)]
        print(f"tiktoken encode_ordinary, one thread: {rates[-1]:6.1f} MB/s", flush=True)
        for tokenizer in args.tokenizers.split(","):
            cmd = [sys.executable, str(ROOT / "data" / "prepare_text.py"), f"--input={path}", f"--name={tokenizer}",
                   f"--data_dir={tmp}", f"--tokenizer={tokenizer}", f"--num_proc={args.num_proc}"]
            if tokenizer == "bpe":
                cmd += [f"--vocab_size={args.vocab_size}", f"--bpe_sample_mb={args.bpe_sample_mb}"]
            seconds, peak, out = run_measured(cmd)
            rates.append(tiktoken_rate(path))
            rate = (rates[-2] + rates[-1]) / 2
            print(f"prepare_text --tokenizer={tokenizer:<5} {size / seconds / 1e6:6.1f} MB/s "
                  f"({size / seconds / 1e6 / rate:4.2f}x tiktoken), {seconds:6.1f} s, peak memory {peak / 2**20:,.0f} MB "
                  f"(all processes)", flush=True)
            trained = re.search(r"^trained a byte-level BPE .* in ([\d.]+) s$", out, re.M)
            if trained:
                print(f"  {trained.group(0)}", flush=True)
            encoded = re.search(r"^encoded [\d,.]+ MB on (\d+) process\(es\) in [\d.]+ s \(([\d,.]+) MB/s\)$", out, re.M)
            if encoded:
                mbs = float(encoded.group(2).replace(",", ""))
                print(f"  encoding (and writing) on {encoded.group(1)} process(es): {mbs:6.1f} MB/s ({mbs / rate:4.2f}x "
                      f"tiktoken on one thread)", flush=True)
            print(f"tiktoken encode_ordinary, one thread: {rates[-1]:6.1f} MB/s", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
