"""How promptly every script and tool stops on Ctrl-C or SIGTERM, at evenly spread moments of its work.

    python tools/bench_stops.py --out_dir=out-shakespeare-char-fast [--config=config/train_shakespeare_char_fast.py]
                                [--moments=6] [--signals=SIGINT,SIGTERM]

For each command below (train.py resuming a copy of the run, sample.py, tools/evaluate.py, data/prepare_text.py with
GPT-2's tokenizer and training a BPE (tokenizers' Rust, which a signal cannot reach, runs in a child), tools/export_hf.py,
tools/export_gguf.py, tools/serve.py with a stream open), it first times one whole run, then starts
it again --moments times per signal and sends the signal at evenly spread moments of that time. It prints, per command
and signal, the slowest stop (signal to exit), and flags any run whose exit code is not 128 + the signal (0 once it had
finished; 0 for the server's Ctrl-C), whose last line is not the toolkit's, or that printed a traceback. The promise:
every stop within 2 s on a quiet machine; docs/performance.md has the figures. Outputs go to a temporary directory.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below: a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core import system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import INTERRUPTED, UserError, run_main
from gpt_toolkit.models.checkpoint import BEST


def parser():
    p = tool_parser(__file__, __doc__)
    p.add_argument("--out_dir", required=True, help="a trained run (its ckpt.pt): what the tools read")
    p.add_argument("--config", default="config/train_shakespeare_char_fast.py", help="the config it was trained with "
                   "(train.py resumes a copy of it; default config/train_shakespeare_char_fast.py)")
    p.add_argument("--moments", type=int, default=6, help="signals per command and signal kind (default 6)")
    p.add_argument("--signals", default="SIGINT,SIGTERM", help="which signals (default SIGINT,SIGTERM)")
    return p


def commands(run, config, tmp, text):
    """name -> (argv after python, what to clear before each start)."""
    big, varied = tmp / "big.txt", tmp / "varied.txt"
    if not big.exists():
        big.write_text(text * 40, encoding="utf-8")
        # 18 MB whose words vary (a vowel swapped in each copy): a BPE's training takes most of its run
        varied.write_text("".join(text.replace("e", c) for c in "eaiouyxz" * 2), encoding="utf-8")
    return {
        "train.py (resume)": (["train.py", config, f"--out_dir={tmp / 'train'}", "--init_from=resume",
                               "--max_iters=100000", "--lr_decay_iters=100000"], []),
        "sample.py": (["sample.py", f"--out_dir={run}", "--num_samples=4", "--max_new_tokens=3000"], []),
        "tools/evaluate.py": (["tools/evaluate.py", f"--out_dir={run}", "--split=train"], []),
        "data/prepare_text.py": (["data/prepare_text.py", f"--input={big}", "--name=big", "--tokenizer=gpt2",
                                  f"--data_dir={tmp}"], [tmp / "big"]),
        "data/prepare_text.py (bpe)": (["data/prepare_text.py", f"--input={varied}", "--name=bpe", "--tokenizer=bpe",
                                        "--vocab_size=4096", f"--data_dir={tmp}"], [tmp / "bpe"]),
        "tools/export_hf.py": (["tools/export_hf.py", f"--out_dir={run}", f"--to={tmp / 'hf'}"], [tmp / "hf"]),
        "tools/export_gguf.py": (["tools/export_gguf.py", f"--out_dir={run}", f"--to={tmp / 'x.gguf'}"],
                                 [tmp / "x.gguf"]),
        "tools/serve.py": (["tools/serve.py", f"--out_dir={run}", "--port=0"], []),
    }


def clear(paths):
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def start(argv, env):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **system.utf8_pipes(env))


def serve_busy(argv, env, port):
    """The server on `port`, once it answers, with one long stream open (read by nobody: the server must not care)."""
    argv = [a if a != "--port=0" else f"--port={port}" for a in argv] + ["--max_tokens=100000"]
    proc = start(argv, env)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                raise UserError(f"the server did not start: {proc.stderr.read()[-300:]}") from None
            time.sleep(0.2)
    body = b'{"prompt": "\\n", "max_tokens": 100000, "n": 8, "stream": true}'
    stream = urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", data=body, method="POST",
                                                           headers={"Content-Type": "application/json"}), timeout=60)
    stream.readline()
    return proc, stream


def verdict(proc, out, err, sig, server):
    """A problem in words, or None."""
    if "Traceback" in err:
        return "a traceback"
    if server:
        expected = 0 if sig == signal.SIGINT else 128 + sig
        return None if proc.returncode == expected and "server stopped" in out else f"exit {proc.returncode}"
    if proc.returncode == 0:
        return None  # it had finished
    if proc.returncode != 128 + sig:
        return f"exit {proc.returncode}"
    said = INTERRUPTED in err or f"interrupted ({signal.Signals(sig).name})" in out + err  # a tool's line, a run's
    return None if said else f"no stop line (stderr ends {err.strip()[-80:]!r})"


def main(argv):
    args = parser().parse(argv)[0]
    signals = [getattr(signal, name.strip()) for name in args.signals.split(",") if name.strip()]
    run = Path(args.out_dir)
    if not (run / BEST).exists():
        raise UserError(f"{run} has no {BEST}: train one first (README's first command)")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    text = (ROOT / "data" / "shakespeare_char" / "input.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shutil.copytree(run, tmp / "train", ignore=shutil.ignore_patterns(".gpt-toolkit.lock"))
        problems = []
        for name, (cmd, outputs) in commands(run, args.config, tmp, text).items():
            server = name == "tools/serve.py"
            clear(outputs)
            t0 = time.perf_counter()
            whole = 20.0 if server or name.startswith("train.py") else None  # these never end by themselves
            if whole is None:
                proc = start(cmd, env)
                proc.communicate()
                whole = time.perf_counter() - t0
            for sig in signals:
                worst = 0.0
                for i in range(args.moments):
                    clear(outputs)
                    if server:
                        with socket.socket() as s:
                            s.bind(("127.0.0.1", 0))
                            port = s.getsockname()[1]
                        proc, _ = serve_busy(cmd, env, port)
                        time.sleep(whole * i / args.moments / 10)
                    else:
                        proc = start(cmd, env)
                        time.sleep(0.2 + whole * i / args.moments)
                    t1 = time.perf_counter()
                    proc.send_signal(sig)
                    out, err = proc.communicate(timeout=120)
                    took = time.perf_counter() - t1
                    worst = max(worst, took)
                    problem = verdict(proc, out, err, sig, server)
                    if problem:
                        problems.append(f"{name} {signal.Signals(sig).name} at moment {i}: {problem}")
                print(f"{name:26} {signal.Signals(sig).name:7} slowest stop {worst:5.2f} s over {args.moments} moments "
                      f"of a {whole:.1f} s run", flush=True)
        clear([tmp / "train"])
    print("problems: " + ("; ".join(problems) if problems else "none"))
    return 1 if problems else 0


if __name__ == "__main__":
    run_main(main)
