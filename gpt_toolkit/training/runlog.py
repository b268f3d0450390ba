"""A run's log: what train.py prints, copied to out_dir/training.log, plus out_dir/metrics.jsonl.

The text lines are an interface (the tutorial's tools parse them with regexes), so they are formatted
here and nowhere else, next to the patterns that read them back:
    step {n}: train loss {:.4f}, val loss {:.4f}
    iter {n}: loss {:.4f}, time {:.2f}ms, mfu {:.2f}%      (", mfu ..." once measured: from the 5th step on)
    training took {:.2f} seconds
and, read by no tool, at each evaluation between the first and the last:
    progress: {n}/{max_iters} steps ({:.0f}%), {elapsed} elapsed, about {left} left (ends ~HH:MM)
"""
import json
import os
import re
import sys
import time
from pathlib import Path

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import atomic_write_text, keep_numbered, open_no_follow

EVAL_RE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_RE = re.compile(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms(?:, mfu (-?[\d.]+)%)?")  # -100%: older logs, nanoGPT's
TOOK_RE = re.compile(r"training took ([\d.]+) seconds")
TOTAL_TIME_RE = re.compile(r"with the parts before this resume: ([\d.]+) seconds of training in all")
STOPPED_RE = re.compile(r"^(interrupted \(SIG\w+\)|aborted by a second interrupt)")  # a signal ended this part
RESUMED_RE = re.compile(r"^resuming from .* at step \d+")
STARTED_RE = re.compile(r"^device \S+, dtype \S+, compile ")  # this toolkit's train.py started (not nanoGPT's)


def eval_line(step, train_loss, val_loss):
    return f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"


def iter_line(step, loss, time_ms, mfu):
    """mfu is None until measured (nanoGPT prints -100.00% then): the part is left out, not shown negative."""
    line = f"iter {step}: loss {loss:.4f}, time {time_ms:.2f}ms"
    return line if mfu is None else f"{line}, mfu {mfu * 100:.2f}%"


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def took_line(seconds):
    return f"training took {seconds:.2f} seconds"


def total_time_line(seconds):
    """A resumed run's time over all its parts (worded so the tutorial's "training took" regex finds this part's)."""
    return f"with the parts before this resume: {seconds:.2f} seconds of training in all"


def duration(seconds):
    """12s, 3m05s, 2h07m (and 1234567h00m: no days, no overflow for any finite number)."""
    seconds = int(round(min(seconds, 1e15)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def ends_at(when):
    """' (ends ~14:07)', or ' (ends in more than a year)' past what a clock time says."""
    if when - time.time() > 366 * 86400:
        return " (ends in more than a year)"
    return f" (ends ~{time.strftime('%H:%M', time.localtime(when))})"


def progress_line(step, max_iters, elapsed, left, now=None):
    """The log line at an evaluation; worded so that no tutorial regex ("step N:", "train loss", "training took")
    matches it."""
    line = f"progress: {step}/{max_iters} steps ({100 * step / max_iters:.0f}%), {duration(elapsed)} elapsed"
    if left is None:
        return line
    return f"{line}, about {duration(left)} left{ends_at((now or time.time()) + left)}"


class LogWriteError(UserError):
    """Writing training.log or metrics.jsonl failed (a full disk, a file-size limit): the run must stop."""

    def __init__(self, path, error):
        super().__init__(f"could not write {path} ({error.strerror or error})")
        self.path, self.error = path, error


class LogFailedOnRank0(LogWriteError):
    """What the other DDP processes stop with when rank 0, which writes the logs, could not write them."""

    def __init__(self):
        UserError.__init__(self, "rank 0 could not write the run's log, so every process stopped (rank 0's error says "
                                 "what was saved)")
        self.path = self.error = None  # rank 0's


class RunLog:
    """print() goes to stdout and training.log; metrics() appends one JSON object to metrics.jsonl.

    A new run first sets earlier files aside (training.log.1, ...); a resumed run (resumed_at = its step) appends,
    after dropping from metrics.jsonl what came after the checkpoint it resumes (a killed run logged those steps,
    and the resumed run logs them again) and a last record a kill cut short, so each step is recorded once.
    A write that fails leaves the file ending in a whole line and raises LogWriteError; from then on print() only
    prints, so the run can say what it does about it. With defer_failures (rank 0 of several DDP processes) the
    failure is kept in .failed instead: the processes stop for it together once a multiple of log_interval steps is
    done or the loop ends (guards.Agreement), so that none waits alone in a collective. Each metrics record also goes to the
    optional trackers (TensorBoard, W&B). With enabled=False (non-zero DDP ranks) every call does nothing."""

    def __init__(self, out_dir, append=False, enabled=True, trackers=(), resumed_at=None, defer_failures=False):
        self.enabled, self.defer_failures = enabled, defer_failures
        self.trackers = list(trackers)
        self.text = self.jsonl = None
        self.failed = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        self.text_path, self.jsonl_path = out_dir / "training.log", out_dir / "metrics.jsonl"
        self.set_aside = []
        if append:  # refused before metrics.jsonl is rewritten: a link or a directory there is one line, untouched
            for path in (self.text_path, self.jsonl_path):
                os.close(open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
        if not append:
            self.set_aside = [p for p in (keep_numbered(self.text_path), keep_numbered(self.jsonl_path)) if p]
        elif resumed_at is not None and self.jsonl_path.exists():
            _keep_until(self.jsonl_path, resumed_at)
        # unbuffered: a line is on its way to the disk when the call returns, and a failed one can be taken back whole
        self.text, self.jsonl = (os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab",
                                           buffering=0) for path in (self.text_path, self.jsonl_path))

    def print(self, msg="", screen=None):
        """msg on stdout and in training.log; screen, where given, is what stdout shows instead (a shorter form)."""
        if not self.enabled:
            return
        screen_failed = None
        try:
            print(msg if screen is None else screen, flush=True)
        except OSError as e:  # its reader went away (`2>&1 | tee`, ended by the same Ctrl-C that is stopping this run),
            system.silence_stream(sys.stdout)  # or a full disk under `> file`: later lines go nowhere, not fail again
            screen_failed = None if system.reader_gone(e) else e
        if self.failed is None:  # training.log keeps the line either way
            self._write(self.text, self.text_path, msg + "\n")
        if screen_failed is not None:  # a full disk: the run stops and saves, as for a full log
            raise LogWriteError("stdout", screen_failed)

    def metrics(self, record):
        if not self.enabled:
            return
        if self.failed is None:
            self._write(self.jsonl, self.jsonl_path, json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def _write(self, f, path, line):
        data, end = line.encode("utf-8"), f.tell()
        try:
            while data:
                data = data[f.write(data):]
        except OSError as e:
            self.failed = LogWriteError(path, e)
            try:  # the part of the line that made it to disk goes, so the file ends in a whole line
                os.truncate(path, end)
            except OSError:
                pass
            if not self.defer_failures:
                raise self.failed from None

    def close(self):
        for f in (self.text, self.jsonl):
            if f is not None:
                f.close()
        self.text = self.jsonl = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _keep_until(path, step):
    """Rewrite metrics.jsonl (whole or not at all) keeping the records a run resumed at `step` will not write again:
    evaluations up to step (it was evaluated before its save), everything else before it; lines that do not parse
    (a record a kill cut short) go too."""
    kept, changed = [], False
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if well_formed(record):
            at = record.get("step", record.get("iter"))
            keep = at is None or at < step or (record.get("type") == "eval" and at == step)
        else:  # a record a kill cut short, or one edited into something no run writes
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            changed = True
    if changed:
        atomic_write_text(path, "".join(kept))


def _step_of(record):
    return record["step"] if record["type"] == "eval" else record["iter"]


class TensorBoardTracker:
    """Every number of every metrics record as a scalar '<type>/<key>' (e.g. eval/val_loss), events in out_dir."""

    def __init__(self, out_dir):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        self.writer = SummaryWriter(log_dir=str(out_dir))

    def log(self, record):
        for key, value in record.items():
            if key not in ("type", "step", "iter") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{record['type']}/{key}", value, _step_of(record))

    def close(self):
        self.writer.close()


class WandbTracker:
    """Evaluations under nanoGPT's W&B names (iter, train/loss, val/loss, lr), iterations as train/iter_loss and mfu."""

    def __init__(self, wandb, project, run_name, config):
        self.wandb = wandb
        wandb.init(project=project, name=run_name, config=config)

    def log(self, record):
        if record["type"] == "eval":
            self.wandb.log({"iter": record["step"], "train/loss": record["train_loss"], "val/loss": record["val_loss"],
                            "lr": record["lr"]})
        else:
            mfu = {} if record.get("mfu") is None else {"mfu": record["mfu"] * 100}
            self.wandb.log({"iter": record["iter"], "train/iter_loss": record["loss"], **mfu})

    def close(self):
        self.wandb.finish()


# ----------------------------------------------------------------------------- reading runs back

PARAMS_RE = re.compile(r"number of parameters: ([\d.]+)M")
TOKENS_PER_ITER_RE = re.compile(r"tokens per iteration: ([\d,]+)")


class LoggedRun:
    """What a finished (or running) training run logged: eval curve, iteration losses, time, size."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.evals = {}  # step -> (train_loss, val_loss); a resumed run's later entry wins
        self.val_bpb = {}  # step -> val bits per byte, where metrics.jsonl has it
        self.elapsed = {}  # step -> seconds since the run (or its latest resume) started, from metrics.jsonl
        self.iters = {}  # iter -> dict(loss, time_ms, mfu, tokens_per_s)
        self.tasks = {}  # step -> {task: {acc, acc_norm, ..., centered}}, from --eval_tasks' records
        self.core = {}  # step -> the CORE-style mean of the tasks' centered scores
        self.took = None  # seconds, from "training took N seconds"
        # how the text log's last part ended: "finished", "interrupted", None (no end line: killed, or still running),
        # or "unknown" (no log of this toolkit's train.py: metrics.jsonl alone, or nanoGPT's own log)
        self.ended = "unknown"
        self.num_params = None
        self.tokens_per_iter = None
        self.config = {}

    @property
    def steps(self):
        return sorted(self.evals)

    @property
    def train_losses(self):
        return [self.evals[s][0] for s in self.steps]

    @property
    def val_losses(self):
        return [self.evals[s][1] for s in self.steps]

    def best_val(self):
        """(step, val_loss) of the lowest val loss."""
        step = min(self.evals, key=lambda s: self.evals[s][1])
        return step, self.evals[step][1]

    def tokens_per_s(self):
        """Median training throughput over the logged iterations (leaving out the first three, warm-up, when
        there are plenty)."""
        rates = [it["tokens_per_s"] for _, it in sorted(self.iters.items()) if it.get("tokens_per_s")]
        if not rates and self.tokens_per_iter:
            rates = [self.tokens_per_iter / (it["time_ms"] / 1000) for _, it in sorted(self.iters.items()) if it["time_ms"] > 0]
        if len(rates) > 6:
            rates = rates[3:]
        return sorted(rates)[len(rates) // 2] if rates else None


def _read_text_log(run, path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if STARTED_RE.match(line):  # a part of the run starts: its end lines are to come
                run.ended = None
            elif STOPPED_RE.match(line):
                run.ended = "interrupted"
            elif RESUMED_RE.match(line):
                run.ended = None
            elif TOOK_RE.search(line) and run.ended is None:
                run.ended = "finished"
            if m := EVAL_RE.search(line):
                run.evals[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
            elif m := ITER_RE.search(line):
                run.iters[int(m.group(1))] = {"loss": float(m.group(2)), "time_ms": float(m.group(3)),
                                              "mfu": float(m.group(4)) / 100 if m.group(4) else None}
            elif m := TOOK_RE.search(line):
                run.took = float(m.group(1))
            elif m := TOTAL_TIME_RE.search(line):
                run.took = float(m.group(1))
            elif m := PARAMS_RE.search(line):
                run.num_params = round(float(m.group(1)) * 1e6)
            elif m := TOKENS_PER_ITER_RE.search(line):
                run.tokens_per_iter = int(m.group(1).replace(",", ""))


def well_formed(record):
    """A metrics record as train.py writes it: a dict whose step or iter, where it has one, is a whole number, and
    whose eval and train records have number losses."""
    if not isinstance(record, dict) or not isinstance(record.get("type"), str):
        return False
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if any(key in record and (not isinstance(record[key], int) or isinstance(record[key], bool))
           for key in ("step", "iter")):
        return False
    if record["type"] == "eval":
        return "step" in record and number(record.get("train_loss")) and number(record.get("val_loss"))
    if record["type"] == "train":
        return "iter" in record and number(record.get("loss"))
    if record["type"] == "tasks":
        return "step" in record and number(record.get("core")) and isinstance(record.get("scores"), dict)
    return True


def read_metrics(path, start=0):
    """(well-formed records of metrics.jsonl from line `start` on, the line to continue from). A line cut short by a
    crash, or edited into what no run writes, is skipped; the last line, when it does not parse, may still be being
    written: reading stops before it."""
    records = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True) if Path(
        path).is_file() else []
    for i in range(start, len(lines)):
        try:
            record = json.loads(lines[i])
        except (ValueError, RecursionError):
            if i == len(lines) - 1:
                return records, i
            continue
        if well_formed(record):
            records.append(record)
    return records, len(lines)


def _read_metrics(run, path):
    for record in read_metrics(path)[0]:
        if record.get("type") == "eval":
            run.evals[record["step"]] = (record["train_loss"], record["val_loss"])
            if record.get("val_bpb") is not None:
                run.val_bpb[record["step"]] = record["val_bpb"]
            if record.get("elapsed_s") is not None:
                run.elapsed[record["step"]] = record["elapsed_s"]
        elif record.get("type") == "train":
            run.iters[record["iter"]] = record
        elif record.get("type") == "tasks":
            run.tasks[record["step"]], run.core[record["step"]] = record["scores"], record["core"]


def read_config_json(path):
    """A run's config.json as a dict, or None where there is none or it is damaged (a table of runs goes on)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def read_run(path, name=None):
    """A run from a text log (training.log or a `tee`d NAME.log), a metrics.jsonl, or an out_dir.

    An out_dir is read from its metrics.jsonl and training.log (time, size) together. Raises ValueError
    when nothing parseable is found."""
    path = Path(path)
    if path.is_dir():
        run = LoggedRun(name or path.name, path)
        if (path / "training.log").exists():
            _read_text_log(run, path / "training.log")
        if (path / "metrics.jsonl").exists():
            _read_metrics(run, path / "metrics.jsonl")
        run.config = read_config_json(path / "config.json") or {}
        run.num_params = run.config.get("num_params", run.num_params)
    elif path.exists():
        run = LoggedRun(name or path.name.removesuffix(".log").removesuffix(".jsonl"), path)
        (_read_metrics if path.suffix == ".jsonl" else _read_text_log)(run, path)
    else:
        raise ValueError(f"{path} does not exist")
    if not run.evals:
        beside = path.with_suffix("") / "training.log"  # a tee'd NAME.log emptied by a command typed again
        hint = (f": its run's own log is {beside} (pass that, or the directory)" if path.is_file() and beside.is_file()
                else " (is it a train.py log?)")
        raise ValueError(f"{path} has no line like 'step N: train loss X, val loss Y'{hint}")
    return run
