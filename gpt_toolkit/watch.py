"""The seam between train.py's loop, which is nanoGPT's (tutorial ch03), and everything a robust run adds to it. A
Watch keeps, behind one line each in the loop:
  - Ctrl-C and SIGTERM (stopping.StopRequest): they end an evaluation or a step's forward and backward at once, and
    the run saves the state after its last whole step; a step they cut short gives its RNG draws back;
  - torch.compile's fallback: a step whose compiled graph fails runs again eagerly, from the same RNG state;
  - the NaN/Inf guard (diagnostics.NonFiniteGuard) and the gradient monitor (--grad_monitor_interval);
  - the time per step and MFU of the log lines, the whole run's estimate and a line now and then through slow phases;
  - DDP's agreement: every process stops after the same step.
Tools and tests subclass it: after_backward(step, module) is where a test puts a fault (an inf gradient, an
allocation that fails), step_done(...) where a tool times steps."""
import contextlib
import time

from gpt_toolkit import distributed, hardware, sharding
from gpt_toolkit.checkpoint import rng_state, set_rng_state
from gpt_toolkit.compiling import CompiledOrEager
from gpt_toolkit.diagnostics import GradMonitor, NonFiniteGuard, grad_record_lines
from gpt_toolkit.evaluation import eval_to_step_ratio
from gpt_toolkit.progress import Eta, Heartbeat, StepTimer
from gpt_toolkit.runlog import LogFailedOnRank0, duration, ends_at, iter_line, plural
from gpt_toolkit.stopping import Interrupted

# tutorial ch01 7.1's quick-experiment model, n_head included: the GPU config's 6 heads do not divide n_embd=128
CPU_ADVICE = "--batch_size=16 --block_size=64 --n_layer=2 --n_head=2 --n_embd=128 --eval_iters=20"


class Watch:
    """What train.py's loop watches with (see the module docstring). `stop` is the run's StopRequest (entered
    already: it covers building the run too); `model` the raw model that `training` (training.Training) trains;
    `wrap(module)` puts a module in DDP when several processes train it; `on_compile_failure(cause, step)` records a
    fallback in the run's files. The log lines go to log.print, rank 0's."""

    def __init__(self, *, stop, cfg, world, log, model, training, wrap, on_compile_failure, peak_flops, peak_source):
        self.stop_request, self.cfg, self.world, self.log = stop, cfg, world, log
        self.device, self.scaler, self.wrap, self.on_compile_failure = world.device, training.scaler, wrap, on_compile_failure
        self.model, self.optimizer = model, training.optimizer
        self.compiled = None
        if world.compile:
            log.print("compiling the model... (takes a minute)")
            self.compiled = CompiledOrEager(model, log.print, "training")
        self.module = wrap(self.compiled.current if self.compiled else model)  # what a step runs
        self.guard = NonFiniteGuard(world.device, training.scaler)
        self.monitor = GradMonitor(model, cfg.grad_monitor_interval) if cfg.grad_monitor_interval and world.master else None
        per_rank_accum = cfg.gradient_accumulation_steps // world.size
        self.timer = StepTimer(flops_per_iter=model.flops_per_token(cfg.block_size) * cfg.block_size * cfg.batch_size
                               * per_rank_accum, peak_flops=peak_flops, peak_source=peak_source)
        self.eta = Eta(max_iters=cfg.max_iters, eval_interval=cfg.eval_interval)
        self.heartbeat = Heartbeat(log.print)
        self.kept = lambda: "no checkpoint had been saved yet"  # what is on disk: set by train.py to its saves' kept
        self.during = None  # the phase a stop came in: "iter N", "the evaluation at step N"
        self.redo = False  # the last step failed to compile: run it again (eagerly)
        self.first_step = self.run_started = self.eval_started = self.grad_record = self.scale_before = None
        self.estimated = False

    @property
    def compiling(self):
        return self.compiled is not None and self.compiled.failed is None

    @property
    def master(self):
        return self.world.master

    def start(self, step):
        """The loop starts at `step`: a resumed run's, or 0 (the MFU and the estimate wait for this process's own
        first steps)."""
        self.first_step, self.run_started = step, time.time()

    # ------------------------------------------------------------------ phases

    @contextlib.contextmanager
    def phase(self, name):
        """A long phase that Ctrl-C or SIGTERM ends at once (Interrupted); `name` says where, for the stop's line."""
        self.during = name
        with self.stop_request.interruptible():
            yield
        self.during = None

    @contextlib.contextmanager
    def evaluation(self, step):
        """Around an evaluation and its save: the NaN/Inf guard first (nothing broken is evaluated or saved), a
        quiet heartbeat, and the time it takes left out of the steps' timing and counted in the run's estimate."""
        self.guard.check(step, self.kept(), self.log.print)
        self.eval_started = time.time()
        self.heartbeat.quiet()
        yield
        now = time.time()
        self.timer.leave_out(now - self.eval_started)
        self.eta.evaluation_done(self.eval_started, now)

    def evaluation_progress(self, step):
        """progress(split, batches done, of) for estimate_loss: a line now and then through a long evaluation."""
        done = {}

        def progress(split, n, total):
            done[split] = n
            if self.master:
                self.heartbeat.beat(lambda: evaluation_line(step, done, total, time.time() - self.eval_started))
        return progress

    def seconds_left(self, step, now):
        """The run's time left, during the evaluation at `step` (None until a rate is measured)."""
        return self.eta.seconds_left(step, self.eval_started, now)

    @contextlib.contextmanager
    def step(self, step):
        """Around a step's forward and backward passes; yields the module they run (compiled, in DDP, as the run
        asks). Ctrl-C or SIGTERM end them at once, the RNG state going back to the step's start (the state saved is
        the last whole step's). If torch.compile fails in them: one warning, the gradients and the RNG state go back,
        the module becomes the eager one, and self.redo tells the loop to run the step again."""
        self.redo, self.during = False, f"iter {step}"
        rng = rng_state(self.device) if self.stop_request.phases or self.compiling else None
        try:
            with self.stop_request.interruptible():
                yield self.module
                self.after_backward(step, self.module)
        except Interrupted:
            if rng is not None:
                set_rng_state(rng, self.device)  # the interrupted step's dropout draws undone
            raise
        except Exception as e:
            if not self.compiling or self.compiled.fallback(e) is None:
                raise
            self.on_compile_failure(self.compiled.failed, step)
            self.module = self.wrap(self.compiled.current)
            self.module.zero_grad(set_to_none=True)  # whatever the failed attempt accumulated
            set_rng_state(rng, self.device)
            self.redo = True
        self.during = None
        # float16: the GradScaler lowers its scale when it skips a step for inf/NaN gradients (read without a sync)
        self.scale_before = self.scaler._scale.clone() if self.scaler.is_enabled() else None

    def after_backward(self, step, module):
        """Called at the end of each step's backward pass, inside its phase: nothing here; a test's fault goes here."""

    def gradients_ready(self, step):
        """The gradients are unscaled and not clipped yet: the gradient monitor's moment, when it is due."""
        self.grad_record = self.monitor.gradients(step) if self.monitor and self.monitor.due(step) else None

    def step_done(self, step, loss, norm, lr):
        """After the optimizer step: the NaN/Inf guard's record (no host sync), the step's time, and the gradient
        monitor's record when it is due."""
        skipped = self.scaler._scale < self.scale_before if self.scale_before is not None else None
        self.guard.record(loss, sharding.full_tensor(norm) if norm is not None else None, skipped)  # FSDP: all shards
        self.timer.step_done()
        self.eta.step_done(step + 1, time.time())
        if self.grad_record is not None:
            self.grad_record.update(lr=lr, update_ratio=self.monitor.update_ratio())
            self.log.metrics(self.grad_record)
            for line in grad_record_lines(self.grad_record):
                self.log.print(line)

    def check_finite(self, step):
        """The NaN/Inf guard's verdict (a host sync: at log steps only): stops the run with its diagnosis."""
        self.guard.check(step, self.kept(), self.log.print)

    def log_step(self, step, loss, lr):
        """The tutorial's 'iter N: loss X, time Yms, mfu Z%' line and its metrics record (rank 0)."""
        tokens_per_iter = self.cfg.gradient_accumulation_steps * self.cfg.batch_size * self.cfg.block_size
        dt = self.timer.lap(step - self.first_step)
        self.log.print(iter_line(step, loss, dt * 1000, self.timer.mfu))
        self.heartbeat.quiet()
        self.log.metrics({"type": "train", "iter": step, "loss": loss, "lr": lr, "time_ms": dt * 1000,
                          "mfu": self.timer.mfu, "tokens_per_s": tokens_per_iter / dt})

    def between_steps(self, step):
        """After a step and its log line, `step` steps done: once three are timed the whole run's estimate, a line now
        and then through slow steps; returns the signal that asks the loop to stop now, or None. Several DDP
        processes agree on it at log steps (a collective), so that all stop after the same step; likewise for a log
        write that failed on rank 0 (every process raises LogWriteError there)."""
        if self.master and not self.estimated and step - self.first_step >= 3:
            self.estimated = self.print_estimate(step)
        if self.master:
            self.heartbeat.beat(lambda: training_line(step, self.cfg.max_iters, self.eta.per_step(time.time())))
        if self.world.size == 1 or step % self.cfg.log_interval == 0:
            signum, log_failed = distributed.stop_reasons(self.stop_request.signum, self.log.failed is not None,
                                                          self.device, self.world.size)
            if log_failed:
                self.stop_for_the_log()
            return signum
        return None

    def stop_if_the_log_failed(self):
        """Once the loop has ended (on every process: a collective): rank 0's log write that failed after the last
        step the processes agreed at stops them all the same way."""
        if distributed.stop_reasons(None, self.log.failed is not None, self.device, self.world.size)[1]:
            self.stop_for_the_log()

    def stop_for_the_log(self):
        """Every DDP process raises LogWriteError for rank 0's failed log write: rank 0 its own, the others theirs."""
        raise self.log.failed or LogFailedOnRank0()

    # ------------------------------------------------------------------ lines about the whole run

    def print_estimate(self, step):
        """Once the first steps are timed: how long the whole run takes on this device, evaluations included (an
        evaluation timed already, else its forward passes at the steps' pace). Returns True once printed."""
        cfg, now = self.cfg, time.time()
        rate = self.eta.per_step(now)
        per_eval = self.eta.last_eval if self.eta.last_eval is not None else rate * eval_to_step_ratio(cfg)
        estimate = self.eta.whole_run(step, now, per_eval=per_eval)
        if estimate is None:
            return False
        left, evals = estimate
        self.log.print(f"estimate: about {duration(left)} more on {self.device} ({plural(cfg.max_iters - step, 'step')} "
                       f"at {rate:.2f} s, {plural(evals, 'evaluation')} at {duration(per_eval)});"
                       f"{ends_at(now + left).replace(' (', ' ').rstrip(')')}")
        return True

    def say_when_sized_for_another_machine(self, step, evaluated):
        """On a CPU (or MPS), one line at the start when the planned run needs more than ~10 minutes even at the
        device's measured matmul peak, with what the tutorial advises for a CPU. Advice, not a refusal."""
        cfg = self.cfg
        if not self.master or hardware.device_type(self.device) == "cuda" or cfg.eval_only:
            return
        evals = self.eta.evals_after(step) + (0 if evaluated and step else 1)
        step_flops = self.timer.flops_per_iter * self.world.size
        seconds = (cfg.max_iters - step + evals * eval_to_step_ratio(cfg)) * step_flops / self.timer.peak_flops
        if seconds > 600:
            self.log.print(
                f"note: this config is sized for a GPU: on {self.device} it needs at least {duration(seconds)} "
                f"({plural(cfg.max_iters - step, 'step')} and {plural(evals, 'evaluation')} of {cfg.eval_iters} "
                f"batches, at a peak of {self.timer.peak_flops / 1e9:.3g} GFLOP/s: {self.timer.peak_source}); for a "
                f"CPU the tutorial advises a smaller batch, context, model and eval_iters (ch01 7.1: {CPU_ADVICE}), or "
                f"config/train_shakespeare_char_cpu.py")


def training_line(steps_done, max_iters, rate):
    """'training: 13/5000 steps done, 6.10 s per step' (the rate once two steps are timed)."""
    return f"training: {steps_done}/{max_iters} steps done" + (f", {rate:.2f} s per step" if rate else "")


def evaluation_line(step, done, total, elapsed):
    """'evaluating at step 0: train 15/200 batches, val 0/200 (22s so far, about 9m44s in all)'."""
    batches = sum(done.values())
    whole = f", about {duration(elapsed * 2 * total / batches)} in all" if batches else ""
    return (f"evaluating at step {step}: train {done.get('train', 0)}/{total} batches, val {done.get('val', 0)}/{total} "
            f"({duration(elapsed)} so far{whole})")

