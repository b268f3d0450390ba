"""The server under load: requests/s, time to first token and tokens/s at 1, 4 and 16 concurrent streaming clients.

    python tools/bench_serve.py --out_dir=out-shakespeare-char-fast [--tokens=100] [--requests=4] [--clients=1,4,16]

Starts tools/serve.py on a free port with that run, then, for each number of clients, has every client stream
--requests completions of --tokens tokens one after another (/v1/completions, stream=true, temperature 0.8), and
prints the requests completed per second, the median and 90th-percentile (nearest rank) time to the first token, and
the tokens per second of all clients together (the tokens the server says it generated: its usage chunk).
docs/serving.md has the figures.
"""
import http.client
import json
import math
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()

from gpt_toolkit.core import system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main


def parser():
    p = tool_parser(__file__, __doc__)
    p.add_argument("--out_dir", required=True, help="the run to serve")
    p.add_argument("--tokens", type=int, default=100, help="tokens per completion (default 100)")
    p.add_argument("--requests", type=int, default=4, help="completions each client streams in turn (default 4)")
    p.add_argument("--clients", default="1,4,16", help="the numbers of concurrent clients (default 1,4,16)")
    return p


def stream_one(port, tokens, seed):
    """(seconds to the first token, tokens generated, seconds in all) of one streamed completion."""
    body = json.dumps({"prompt": "\n", "max_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise UserError(f"the server answered {response.status}: {response.read()[:200]!r}")
    first, generated = None, None
    for line in response:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:  # the server cut the stream short (stopping, a failed generation)
                raise UserError(f"the server ended a stream with an error: {chunk['error'].get('message')}")
            if chunk.get("usage"):  # the last chunk: no text, the counts
                generated = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - t0
    conn.close()
    if first is None or generated is None:
        raise UserError("the server's stream had no text or no usage chunk: is tools/serve.py this toolkit's?")
    return first, generated, time.perf_counter() - t0


def load(port, clients, requests, tokens):
    """(requests/s, median and p90 time to first token, tokens/s) with `clients` clients at once."""
    results, lock = [], threading.Lock()

    def client(c):
        for r in range(requests):
            out = stream_one(port, tokens, seed=1000 * c + r)
            with lock:
                results.append(out)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return len(results) / wall, statistics.median(ttft), p90(ttft), sum(r[1] for r in results) / wall


def p90(ordered):
    """The 90th percentile of sorted values, by nearest rank: the smallest value with 90% of them at or below it."""
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def main(argv):
    args = parser().parse(argv)[0]
    clients = [int(c) for c in args.clients.split(",")]
    if args.tokens < 1 or args.requests < 1 or min(clients) < 1:
        raise UserError("--tokens, --requests and every --clients number must be positive")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "tools" / "serve.py"), f"--out_dir={args.out_dir}",
                               f"--port={port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              **system.utf8_pipes())
    try:
        line = server.stdout.readline()
        if not line.startswith("serving"):
            raise UserError(f"tools/serve.py did not start: {server.communicate(timeout=60)[1].strip()}")
        print(f"a server for this benchmark (it stops when the benchmark ends): {line.strip()}")
        stream_one(port, 8, 0)  # warm-up
        print(f"each client streams {args.requests} completion{'s' if args.requests > 1 else ''} of {args.tokens} "
              f"tokens, one after another")
        print(f"{'clients':>7} {'requests/s':>11} {'first token (median)':>21} {'(p90)':>8} {'tokens/s':>9}")
        for c in clients:
            rps, ttft, ttft90, tps = load(port, c, args.requests, args.tokens)
            print(f"{c:>7} {rps:11.2f} {ttft * 1000:18.0f} ms {ttft90 * 1000:5.0f} ms {tps:9.0f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    run_main(main)
