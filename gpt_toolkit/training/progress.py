"""How fast a training run goes and when it will end: the time per iteration and MFU of the log lines (StepTimer),
and an estimate of the time left from the measured time per step and per evaluation (Eta)."""
import statistics
import time


def flops_per_step(model, cfg, world_size):
    """The FLOPs of one optimizer step in one of world_size processes (its share of the micro-batches)."""
    per_rank_accum = cfg.gradient_accumulation_steps // world_size
    return model.flops_per_token(cfg.block_size) * cfg.block_size * cfg.batch_size * per_rank_accum


class StepTimer:
    """Milliseconds per iteration since the last log line, evaluations left out, and the MFU's running average
    (0.9 old, 0.1 new, nanoGPT's), started once a process has run 5 steps (allocation, compilation pass first)."""

    def __init__(self, *, flops_per_iter, peak_flops, peak_source=""):
        self.flops_per_iter, self.peak_flops, self.peak_source = flops_per_iter, peak_flops, peak_source
        self.start, self.iters, self.mfu = time.time(), 0, None  # None until measured

    def step_done(self):
        self.iters += 1

    def leave_out(self, seconds):
        """Time that is not training (an evaluation and its save)."""
        self.start += seconds

    def lap(self, steps_in_this_process):
        """Seconds per iteration since the last lap; updates self.mfu."""
        now = time.time()
        dt = (now - self.start) / self.iters
        self.start, self.iters = now, 0
        if steps_in_this_process >= 5:
            mfu = self.flops_per_iter / dt / self.peak_flops
            self.mfu = mfu if self.mfu is None else 0.9 * self.mfu + 0.1 * mfu
        return dt


class Eta:
    """Seconds a run still needs. The clock starts after the first step of this process, so start-up costs that
    happen once (allocation, compilation) do not inflate the rate; evaluations are timed apart from the steps."""

    # the start-of-run estimate waits for this many timed steps, or fewer that took this long: three steps' mean
    # read 2-4x long when another program took the cores for a moment (a newcomer's busy laptop)
    SETTLED_STEPS, SETTLED_SECONDS = 10, 5.0

    def __init__(self, *, max_iters, eval_interval, synchronous=True):
        self.max_iters, self.eval_interval = max_iters, eval_interval
        # CPU steps end when their work does; a GPU's are queued, and only a log step's loss.item() waits for them
        self.synchronous = synchronous
        self.t0 = self.step0 = self.last_step = None
        self.eval_seconds = 0.0  # evaluation time since the clock started
        self.last_eval = None  # the latest whole evaluation's duration
        self.steps = []  # the first steps' seconds since the one before (none across an evaluation)
        self.previous = None  # when the last step ended, unless an evaluation came since

    def step_done(self, step, now):
        """Called after each training step (step = steps completed)."""
        if self.t0 is None:
            self.t0, self.step0 = now, step
        if self.previous is not None and len(self.steps) < self.SETTLED_STEPS:  # all the estimate needs
            self.steps.append(now - self.previous)
        self.previous, self.last_step = now, step

    def evaluation_done(self, started, now):
        """An evaluation (with its save) ran from started to now."""
        self.last_eval = now - started
        self.previous = None  # the next step's interval would hold the evaluation
        if self.t0 is not None:
            self.eval_seconds += self.last_eval

    def settled(self):
        """Whether enough steps are timed for the whole run's estimate (3 at least; SETTLED_STEPS, or SETTLED_SECONDS
        of them for slow steps; or SETTLED_STEPS steps done, when evaluations come between every two)."""
        n = len(self.steps)
        done = (self.last_step or 0) - (self.step0 or 0)
        return n >= 3 and (n >= self.SETTLED_STEPS or sum(self.steps) >= self.SETTLED_SECONDS) or \
            done >= self.SETTLED_STEPS

    def typical_step(self, now):
        """A step's seconds, or None before any is timed: on a CPU the median of the first steps (a moment when the
        machine was busy elsewhere moves it little, the mean much); on a GPU, or with no two steps in a row, the
        mean since the clock started (its queued steps are paid for at the log steps' waits)."""
        if self.synchronous and self.steps:
            return statistics.median(self.steps)
        return self.per_step(now)

    def evals_after(self, step):
        """Evaluations still to come after step: every eval_interval, and at max_iters."""
        n = self.max_iters // self.eval_interval - step // self.eval_interval
        return n + (1 if self.max_iters % self.eval_interval else 0) if step < self.max_iters else 0

    def seconds_left(self, step, eval_started, now):
        """The estimate during the evaluation of `step` (begun at eval_started); None until a rate is measured.
        Before a whole evaluation has been timed, this one's time so far stands for each evaluation to come."""
        if self.t0 is None or step <= self.step0:
            return None
        per_step = max(0.0, eval_started - self.t0 - self.eval_seconds) / (step - self.step0)
        per_eval = self.last_eval if self.last_eval is not None else now - eval_started
        return per_step * (self.max_iters - step) + per_eval * self.evals_after(step)

    def per_step(self, now):
        """Seconds per training step measured so far in this process (evaluations left out), or None."""
        steps = (self.last_step or 0) - (self.step0 or 0)
        if self.t0 is None or steps <= 0:
            return None
        return max(0.0, now - self.t0 - self.eval_seconds) / steps

    def whole_run(self, step, rate, *, per_eval):
        """(seconds the run still needs after `step`, evaluations still to come) at `rate` seconds a step (typical_step),
        with per_eval seconds for each evaluation; None without a rate."""
        if rate is None:
            return None
        return rate * (self.max_iters - step) + per_eval * self.evals_after(step), self.evals_after(step)


class Heartbeat:
    """A line now and then through a phase that prints nothing for long (an evaluation, slow steps): report(text())
    when `first` seconds have passed since the phase began, then every `every` seconds. Any other output resets it
    (quiet())."""

    FIRST, EVERY = 5.0, 15.0

    def __init__(self, report, *, first=None, every=None):
        self.report = report
        self.first = self.FIRST if first is None else first
        self.every = self.EVERY if every is None else every
        self.last = time.time()
        self.waiting = self.first

    def quiet(self):
        """Something was just printed: wait `first` seconds again before the next line."""
        self.last, self.waiting = time.time(), self.first

    def beat(self, text):
        """Print text() if it is due (text is a function: it is not formatted when nothing is printed)."""
        now = time.time()
        if now - self.last >= self.waiting:
            self.report(text())
            self.last, self.waiting = now, self.every
