"""When a run stops before max_iters: on Ctrl-C or SIGTERM (StopRequest), or when val loss stops improving
(EarlyStopping)."""
import contextlib
import os
import signal
import sys

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import SecondInterrupt


class Interrupted(BaseException):
    """The first SIGINT/SIGTERM, raised inside an interruptible() phase so that it ends at once. A BaseException, so
    that no library's `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.during = None  # the phase it ended ("iter 5", "the evaluation at step 100"); None: after a whole step


class StopRequest:
    """SIGINT/SIGTERM. The first one ends a long phase at once when it arrives inside interruptible() (an evaluation,
    the forward and backward passes of a step, compilation: Interrupted is raised there), and otherwise asks the loop
    to stop after the current step; either way the run then saves and exits 128+signal. A second one aborts at once
    (SecondInterrupt, exit 130). With phases=False (several DDP processes, which must stop at the same step) the first
    signal only asks the loop to stop at its next agreed step."""

    def __init__(self, phases=True):
        self.signum = None
        self.previous = {}
        self.phases, self.depth = phases, 0

    @contextlib.contextmanager
    def interruptible(self):
        if not self.phases:
            yield
            return
        if self.signum is not None:  # it came just before this phase: do not start it
            raise Interrupted(self.signum)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def __enter__(self):
        for sig in system.stop_signals():
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():  # as they were: a process that runs on (a tool, a test) keeps them
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise SecondInterrupt(signum)
        self.signum = signum
        now = self.depth > 0
        message = (f"\n{signal.Signals(signum).name}: {'stopping now' if now else 'finishing this step'}, then saving "
                   f"(send it again to abort without saving)\n")
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # stderr is not a file (captured in this process)
            fd = None
        try:
            if fd is None:
                sys.stderr.write(message)
            else:  # os.write, not print: a handler can run in the middle of another print
                os.write(fd, message.encode())
        except OSError as e:  # the run saves all the same: this line is lost with the screen (`2>&1 | tee`, whose
            if system.reader_gone(e):  # reader this same Ctrl-C ended) or with the full disk stderr goes to
                system.silence_stream(sys.stderr)
        if now:
            raise Interrupted(signum)


class EarlyStopping:
    """Stop after `patience` evaluations in a row that do not lower the best val loss by more than min_delta. It
    counts in `counts`, the run's TrainingState.early_stop, which checkpoints save: a resumed run keeps counting."""

    def __init__(self, patience, min_delta, counts):
        self.patience, self.min_delta, self.counts = patience, min_delta, counts
        for key, start in (("best", float("inf")), ("best_step", 0), ("evals_without_improvement", 0)):
            counts.setdefault(key, start)

    def update(self, val_loss, step):
        """Record an evaluation; True when patience has run out (never with patience 0)."""
        if not self.patience:
            return False
        c = self.counts
        if val_loss < c["best"] - self.min_delta:
            c.update(best=val_loss, best_step=step, evals_without_improvement=0)
        else:
            c["evals_without_improvement"] += 1
        return c["evals_without_improvement"] >= self.patience

    def message(self, step, best_path):
        return (f"early stopping at step {step}: val loss has not improved by more than {self.min_delta} for "
                f"{self.patience} evaluations (best {self.counts['best']:.4f} at step {self.counts['best_step']}); the "
                f"best model is in {best_path}")
