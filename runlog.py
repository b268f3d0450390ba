"""A run's log: what train.py prints, copied to out_dir/training.log, plus out_dir/metrics.jsonl.

The text lines are an interface (the seeds' tools parse them with regexes), so they are formatted
here and nowhere else, next to the patterns that read them back:
    step {n}: train loss {:.4f}, val loss {:.4f}
    iter {n}: loss {:.4f}, time {:.2f}ms, mfu {:.2f}%
    training took {:.2f} seconds
"""
import json
import os
import re
from pathlib import Path

EVAL_RE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_RE = re.compile(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms, mfu (-?[\d.]+)%")
TOOK_RE = re.compile(r"training took ([\d.]+) seconds")


def eval_line(step, train_loss, val_loss):
    return f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"


def iter_line(step, loss, time_ms, mfu):
    return f"iter {step}: loss {loss:.4f}, time {time_ms:.2f}ms, mfu {mfu * 100:.2f}%"


def took_line(seconds):
    return f"training took {seconds:.2f} seconds"


def _set_aside(path):
    """Rename an existing non-empty file to path.1, path.2, ... so a new run never writes over an old log."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    old = path.with_name(f"{path.name}.{n}")
    os.replace(path, old)
    return old


class RunLog:
    """print() goes to stdout and training.log; metrics() appends one JSON object to metrics.jsonl.

    A resumed run appends to the files; a new run first sets earlier ones aside (training.log.1, ...).
    With enabled=False (non-zero DDP ranks) every call does nothing."""

    def __init__(self, out_dir, append=False, enabled=True):
        self.enabled = enabled
        self.text = self.jsonl = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        self.text_path, self.jsonl_path = out_dir / "training.log", out_dir / "metrics.jsonl"
        self.set_aside = []
        if not append:
            self.set_aside = [p for p in (_set_aside(self.text_path), _set_aside(self.jsonl_path)) if p]
        self.text = open(self.text_path, "a", encoding="utf-8")
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def print(self, msg=""):
        if not self.enabled:
            return
        print(msg, flush=True)
        self.text.write(msg + "\n")
        self.text.flush()

    def metrics(self, record):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self):
        for f in (self.text, self.jsonl):
            if f is not None:
                f.close()
