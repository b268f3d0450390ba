"""The guards of train.py's loop, which is nanoGPT's (tutorial ch03). Each guard is one small object with its own
state, called at a few named points; the loop calls them all through Guards, in a handful of lines:

    with guards.evaluation(step) as progress:   around estimate_loss: Ctrl-C ends it at once
    guards.evaluated(step, losses, lr)           after an evaluation: True stops the run (early stopping)
    with guards.step(step) as attempt:           around a step's forward and backward passes
    guards.after_step(step, loss, norm, lr)      after the optimizer step: a stop (Interrupted) to raise, or None
    guards.on_stop(stop)                         a signal or a failed log write stopped the run: save, say, exit code

A Guard overrides only the points it needs: start(run, state), evaluation_starts(step), evaluated(step, losses,
lr), step_starts(step), after_backward(step, module) (inside the step: where a test puts a fault), after_step(step,
loss, norm, lr), end() and on_stop(stop, step). Tools and tests pass their own guards to train.main(argv,
guards=[...]): their after_backward runs before the run's own (a fault there is part of the backward pass the run's
guards then look at), every other point after the run's own (they observe the finished step)."""
import contextlib
import math
import signal
import time
from pathlib import Path

from gpt_toolkit.core import hardware
from gpt_toolkit.core.errors import Aborted, FollowerError, SecondInterrupt, UserError
from gpt_toolkit.models import sharding
from gpt_toolkit.models.checkpoint import BEST, LATEST, rng_state, set_rng_state
from gpt_toolkit.training import distributed
from gpt_toolkit.training.compiling import CompiledOrEager
from gpt_toolkit.training.diagnostics import GradMonitor, NonFiniteGuard, grad_record_lines
from gpt_toolkit.training.evaluation import eval_to_step_ratio
from gpt_toolkit.training.progress import Eta, Heartbeat
from gpt_toolkit.training.runlog import (
    LogFailedOnRank0,
    LogWriteError,
    duration,
    ends_at,
    iter_line,
    plural,
    progress_line,
)
from gpt_toolkit.training.stopping import EarlyStopping, Interrupted

# tutorial ch01 7.1's quick-experiment model, n_head included: the GPU config's 6 heads do not divide n_embd=128
CPU_ADVICE = "--batch_size=16 --block_size=64 --n_layer=2 --n_head=2 --n_embd=128 --eval_iters=20"


class Guard:
    """One guard of the loop: every point does nothing until a subclass overrides it (see the module docstring)."""

    def start(self, run, state):
        """The loop is about to run from state.iter_num; run is train.py's Run (its cfg, world, log, model, saves)."""

    def evaluation_starts(self, step):
        """An evaluation of the model after `step` steps begins."""

    def evaluated(self, step, losses, lr):
        """After the evaluation (losses: None on a DDP process that does not evaluate). True stops the run."""

    def step_starts(self, step):
        """Step `step` begins (again, after a compile fallback)."""

    def after_backward(self, step, module):
        """The step's backward passes are done (gradients still scaled, under float16); module is what ran them."""

    def after_step(self, step, loss, norm, lr):
        """The optimizer stepped: loss is the step's mean loss (a tensor), norm the gradient norm before clipping."""

    def end(self):
        """The loop has ended (on every process)."""

    def on_stop(self, stop, step):
        """A signal (Interrupted) or a failed log write (LogWriteError) stops the run after `step` whole steps."""


class Attempt:
    """One try at a step: the module its passes run (compiled, in DDP, as the run asks); redo is True when
    torch.compile failed in it, and the loop runs the step again, eagerly, from the same state."""

    def __init__(self, module):
        self.module, self.redo = module, False


class Guards:
    """The run's guards, called in order, and the two that go around a step: Ctrl-C and SIGTERM (`stop`, the run's
    StopRequest) and torch.compile's fallback (`compiled`, a CompileFallback)."""

    def __init__(self, stop, compiled, guards, extra=()):
        self.stop_request, self.compiled, self.guards, self.extra = stop, compiled, [*guards, *extra], list(extra)
        self.device = None

    def start(self, run, state):
        self.device, self.state = run.world.device, state
        for guard in self.guards:
            guard.start(run, state)

    @contextlib.contextmanager
    def evaluation(self, step):
        """Around estimate_loss: the guards see it begin, it is a phase, and it yields progress(split, batches done,
        of) for a line now and then. (The NaN/Inf guard looked already, on every process, after the step before.)"""
        for guard in self.guards:
            guard.evaluation_starts(step)
        with phase(self.stop_request, f"the evaluation at step {step}"):
            yield self.first(Progress).evaluation_progress(step)

    def evaluated(self, step, losses, lr):
        """Every guard sees the losses, the evaluation's own log lines first (as they were before NaN/Inf losses stop
        the run); True when one stops the run (early stopping, agreed by every DDP process)."""
        first = self.first(Progress)
        return any([guard.evaluated(step, losses, lr) for guard in [first, *(g for g in self.guards if g is not first)]])

    @contextlib.contextmanager
    def step(self, step):
        """Around a step's forward and backward passes; yields its Attempt. Ctrl-C or SIGTERM end them at once, the
        RNG state going back to the step's start (the state saved is the last whole step's). If torch.compile fails
        in them: one warning, the gradients and the RNG state go back, and attempt.redo asks for the step again."""
        for guard in self.guards:
            guard.step_starts(step)
        attempt = Attempt(self.compiled.module)
        rng = rng_state(self.device) if self.stop_request.phases or self.compiled.compiling else None
        try:
            with phase(self.stop_request, f"iter {step}"):
                yield attempt
                for guard in [*self.extra, *(g for g in self.guards if g not in self.extra)]:
                    guard.after_backward(step, attempt.module)
        except Interrupted:
            if rng is not None:
                set_rng_state(rng, self.device)  # the interrupted step's dropout draws undone
            raise
        except Exception as e:
            if not self.compiled.fall_back(e, step):
                raise
            set_rng_state(rng, self.device)
            attempt.redo = True

    def after_step(self, step, loss, norm, lr):
        """Every guard sees the step; then the stop that a signal asks for (Interrupted), agreed by every DDP process
        at log steps so that all stop after the same step, or None. A log write that failed on rank 0 stops every
        process the same way (LogWriteError)."""
        for guard in self.guards:
            guard.after_step(step, loss, norm, lr)
        return self.first(Agreement).stop_now(step + 1)

    def end(self):
        """The loop ended on every process (a collective): each guard's last word (early stopping's line), then a log
        write that failed on rank 0 after the last step the processes agreed at stops them all the same way."""
        for guard in self.guards:
            guard.end()
        self.first(Agreement).stop_now(None)

    def on_stop(self, stop):
        """A signal or a failed log write stopped the run: each guard in turn (the saver saves and says what is on
        disk). Returns the exit code: 128 + the signal (a log failure raises its one-line error, and a log write that
        fails while a signal's stop is said is handled as a log failure: saved if the disk allows, said in one line)."""
        try:
            for guard in self.guards:
                guard.on_stop(stop, self.state.iter_num)
        except LogWriteError as failed:
            if isinstance(stop, LogWriteError):
                raise
            return self.on_stop(failed)
        return 128 + stop.signum

    def first(self, kind):
        return next((guard for guard in self.guards if isinstance(guard, kind)), None)


def guards_for(cfg, world, *, stop, compiled, timer, tasks, checkpoint, extra=()):
    """The guards of a run with Config cfg in this process (world: train.py's World), in the order they are called:
    the gradient monitor, timing and the log lines (a StepTimer), the NaN/Inf guard, --eval_tasks (an EvalTasks, or
    None), early stopping, DDP's agreement on a stop, and the saver (checkpoint(rng_states): the run's checkpoint
    dict); then `extra`, a tool's or a test's. stop is the run's StopRequest, compiled its CompileFallback."""
    guards = [GradientMonitor(cfg.grad_monitor_interval)] if cfg.grad_monitor_interval and world.master else []
    guards += [NonFiniteStop(), Progress(cfg, world, timer)]  # the NaN/Inf verdict before a step's log line
    if tasks is not None:
        guards.append(TaskScores(tasks, stop))
    if cfg.early_stop_patience:
        guards.append(EarlyStop())
    return Guards(stop, compiled, [*guards, Agreement(stop), Saver(checkpoint)], extra)


@contextlib.contextmanager
def phase(stop, name):
    """A long phase that the first Ctrl-C or SIGTERM (StopRequest stop) ends at once: Interrupted, naming the phase."""
    try:
        with stop.interruptible():
            yield
    except Interrupted as e:
        e.during = e.during or name
        raise


class CompileFallback:
    """torch.compile's fallback for the training step: the module a step runs (compiled where the run compiles, in
    DDP through wrap), and eager from the step whose compiled graph fails. on_failure(cause, step) records it in the
    run's files."""

    def __init__(self, model, *, compile, wrap, log, on_failure):
        self.wrap, self.on_failure, self.compiled = wrap, on_failure, None
        if compile:
            log.print("compiling the model... (takes a minute)")
            self.compiled = CompiledOrEager(model, log.print, "training")
        self.module = wrap(self.compiled.current if self.compiled else model)

    @property
    def compiling(self):
        return self.compiled is not None and self.compiled.failed is None

    def fall_back(self, exc, step):
        """True when exc is torch.compile failing in a step: the warning is said, and the module is eager now."""
        if not self.compiling or self.compiled.fallback(exc) is None:
            return False
        self.on_failure(self.compiled.failed, step)
        self.module = self.wrap(self.compiled.current)
        self.module.zero_grad(set_to_none=True)  # whatever the failed attempt accumulated
        return True


class NonFiniteStop(Guard):
    """The NaN/Inf guard: each step's loss and gradient norm are recorded on the device (no host sync), and read where
    the run looks anyway (log steps, before an evaluation, a stop): a non-finite one stops the run before anything
    broken is evaluated or saved. float16: the GradScaler's skipped steps are counted instead."""

    def start(self, run, state):
        self.cfg, self.log, self.kept, self.state = run.cfg, run.log, run.saves.kept, state
        self.scaler = run.training.scaler
        self.guard = NonFiniteGuard(run.world.device, self.scaler)
        self.scale_before = None

    def evaluated(self, step, losses, lr):
        if losses is not None and not all(math.isfinite(v) for v in losses.values()):
            self.guard.stop(step, self.kept(), self.log.print)

    def after_backward(self, step, module):
        # float16: the GradScaler lowers its scale when it skips a step for inf/NaN gradients (read without a sync)
        self.scale_before = self.scaler._scale.clone() if self.scaler.is_enabled() else None

    def after_step(self, step, loss, norm, lr):
        skipped = self.scaler._scale < self.scale_before if self.scale_before is not None else None
        self.guard.record(loss, sharding.full_tensor(norm) if norm is not None else None, skipped)  # FSDP: all shards
        if step % self.cfg.log_interval == 0 or not self.state.evaluated:  # a log step, or an evaluation comes next
            self.guard.check(step, self.kept(), self.log.print)  # on every process: all stop at the same step

    def on_stop(self, stop, step):
        if isinstance(stop, Interrupted):
            self.guard.check(step, self.kept(), self.log.print)


class GradientMonitor(Guard):
    """--grad_monitor_interval: every N steps, the gradients' norms and histogram (unscaled, before clipping) and the
    update/parameter ratio of the step, as log lines with the tutorial's warnings and a metrics record (rank 0)."""

    def __init__(self, interval):
        self.interval, self.record = interval, None

    def start(self, run, state):
        self.monitor, self.log, self.scaler = GradMonitor(run.model, self.interval), run.log, run.training.scaler

    def after_backward(self, step, module):
        self.record = None
        if self.monitor.due(step):
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0  # float16: the gradients are scaled
            self.record = self.monitor.gradients(step, scale=scale)

    def after_step(self, step, loss, norm, lr):
        if self.record is not None:
            self.record.update(lr=lr, update_ratio=self.monitor.update_ratio())
            self.log.metrics(self.record)
            for line in grad_record_lines(self.record):
                self.log.print(line)


class Progress(Guard):
    """Timing: the tutorial's 'iter N: loss X, time Yms, mfu Z%' line every log_interval steps (evaluations left out
    of the time), the run's estimate once its first steps are timed, the progress line and metrics record of each
    evaluation, and a line now and then through a long evaluation or slow steps (rank 0 prints)."""

    def __init__(self, cfg, world, timer):
        self.cfg, self.world, self.device, self.timer = cfg, world, world.device, timer
        self.eta = Eta(max_iters=cfg.max_iters, eval_interval=cfg.eval_interval,
                       synchronous=hardware.device_type(world.device) == "cpu")
        self.eval_started = None
        self.estimated = False

    def start(self, run, state):
        self.log, self.heartbeat = run.log, Heartbeat(run.log.print)
        self.first_step, self.run_started = state.iter_num, time.time()
        self.say_when_sized_for_another_machine(state.iter_num, state.evaluated)

    def evaluation_starts(self, step):
        self.eval_started = time.time()
        self.heartbeat.quiet()

    def evaluation_progress(self, step):
        """progress(split, batches done, of) for estimate_loss: a line now and then through a long evaluation."""
        done = {}

        def progress(split, n, total):
            done[split] = n
            if self.world.master:
                self.heartbeat.beat(lambda: evaluation_line(step, done, total, time.time() - self.eval_started))
        return progress

    def evaluated(self, step, losses, lr):
        """The run's progress line and the evaluation's metrics record (the tutorial's line is the loop's)."""
        if losses is None:
            return
        cfg, log, now = self.cfg, self.log, time.time()
        left = self.eta.seconds_left(step, self.eval_started, now)
        self.heartbeat.quiet()
        if not cfg.eval_only and 0 < step < cfg.max_iters:
            log.print(progress_line(step, cfg.max_iters, now - self.run_started, left, now))
        log.metrics({"type": "eval", "step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                     **{k: losses[k] for k in ("train_bpb", "val_bpb") if k in losses},
                     "lr": lr, "elapsed_s": now - self.run_started, "eta_s": left,
                     "progress": step / cfg.max_iters if cfg.max_iters else 1.0})

    def step_starts(self, step):
        if self.eval_started is not None:  # the evaluation and its save are over: their time is not the steps'
            now = time.time()
            self.timer.leave_out(now - self.eval_started)
            self.eta.evaluation_done(self.eval_started, now)
            self.eval_started = None

    def after_step(self, step, loss, norm, lr):
        self.timer.step_done()
        self.eta.step_done(step + 1, time.time())
        if step % self.cfg.log_interval == 0 and self.world.master:
            self.log_step(step, loss.item(), lr)
        if self.world.master and not self.estimated and self.eta.settled():
            self.estimated = self.print_estimate(step + 1)
        if self.world.master:
            self.heartbeat.beat(lambda: training_line(step + 1, self.cfg.max_iters, self.eta.per_step(time.time())))

    def log_step(self, step, loss, lr):
        """The tutorial's 'iter N: loss X, time Yms, mfu Z%' line and its metrics record."""
        tokens_per_iter = self.cfg.gradient_accumulation_steps * self.cfg.batch_size * self.cfg.block_size
        dt = self.timer.lap(step - self.first_step)
        self.log.print(iter_line(step, loss, dt * 1000, self.timer.mfu))
        self.heartbeat.quiet()
        self.log.metrics({"type": "train", "iter": step, "loss": loss, "lr": lr, "time_ms": dt * 1000,
                          "mfu": self.timer.mfu, "tokens_per_s": tokens_per_iter / dt})

    def print_estimate(self, step):
        """Once the first steps are timed (Eta.settled): how long the whole run takes on this device, evaluations
        included (an evaluation timed already, else its forward passes at the steps' pace). Returns True once printed."""
        cfg, now = self.cfg, time.time()
        rate = self.eta.typical_step(now)
        if rate is None:
            return False
        per_eval = self.eta.last_eval if self.eta.last_eval is not None else rate * eval_to_step_ratio(cfg)
        estimate = self.eta.whole_run(step, rate, per_eval=per_eval)
        if estimate is None:
            return False
        left, evals = estimate
        each = duration(per_eval) if per_eval >= 1 else "under 1s"
        self.log.print(f"estimate: about {duration(left)} more on {self.device} ({plural(cfg.max_iters - step, 'step')} "
                       f"at {rate:.2f} s, {plural(evals, 'evaluation')} at {each});"
                       f"{ends_at(now + left).replace(' (', ' ').rstrip(')')}")
        return True

    def say_when_sized_for_another_machine(self, step, evaluated):
        """On a CPU (or MPS), one line at the start when the planned run needs more than ~10 minutes even at the
        device's measured matmul peak, with what the tutorial advises for a CPU. Advice, not a refusal."""
        cfg = self.cfg
        if not self.world.master or hardware.device_type(self.device) == "cuda" or cfg.eval_only:
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


class TaskScores(Guard):
    """--eval_tasks: standard tasks scored at each evaluation (nothing random: the run's losses stay the same), in a
    line that names their cost and a metrics record (rank 0)."""

    def __init__(self, tasks, stop):
        self.tasks, self.stop_request = tasks, stop

    def start(self, run, state):
        self.run = run

    def evaluated(self, step, losses, lr):
        if losses is None or not all(math.isfinite(v) for v in losses.values()):
            return
        with phase(self.stop_request, f"the tasks at step {step}"):  # Ctrl-C ends it at once
            scores = self.tasks.score(self.run.model, device=self.run.world.device, ctx=self.run.training.ctx)
        self.run.log.print(self.tasks.line(step, scores))
        self.run.log.metrics(self.tasks.record(step, scores))


class EarlyStop(Guard):
    """--early_stop_patience: stop once val loss has not improved for that many evaluations in a row (the count is
    the run's TrainingState.early_stop, which checkpoints save); every DDP process follows rank 0's decision."""

    def start(self, run, state):
        cfg, self.run, self.stopped_at = run.cfg, run, None
        self.early = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta, state.early_stop)

    def evaluated(self, step, losses, lr):
        cfg, world = self.run.cfg, self.run.world
        due = losses is not None and not cfg.eval_only and self.early.update(losses["val"], step)
        if distributed.agree_with_master(due, world.device, world.size):
            self.stopped_at = step
            return True
        return False

    def end(self):
        if self.stopped_at is not None:  # said once the loop has saved the state it stopped at
            self.run.log.print(self.early.message(self.stopped_at, Path(self.run.cfg.out_dir) / BEST))


class Agreement(Guard):
    """When the run stops after a step: at once for one process; for several DDP processes at log steps only, all
    together (a collective), so that every process stops after the same step. A log write that failed on rank 0
    stops them all the same way (every process raises LogWriteError)."""

    def __init__(self, stop):
        self.stop_request = stop

    def start(self, run, state):
        self.world, self.log, self.cfg = run.world, run.log, run.cfg

    def stop_now(self, steps_done):
        """Interrupted(the signal) when the run stops after `steps_done` steps, else None (steps_done None: the loop
        has ended, and only the log's failure is agreed on)."""
        if steps_done is not None and self.world.size > 1 and steps_done % self.cfg.log_interval:
            return None
        signum, log_failed = distributed.stop_reasons(self.stop_request.signum if steps_done is not None else None,
                                                      self.log.failed is not None, self.world.device, self.world.size)
        if log_failed:
            raise self.log.failed or LogFailedOnRank0()
        return Interrupted(signum) if signum else None


class Saver(Guard):
    """Save on stop. A signal: the state after the last whole step is saved unless latest.pt holds it already (or
    nothing was trained while --overwrite=True's earlier checkpoints wait to come back), and one line says exactly
    what was kept. A failed write of training.log or metrics.jsonl (a full disk): the state is saved if the disk
    allows, and a one-line error says what is on disk. checkpoint(rng_states) is the run's checkpoint dict."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def start(self, run, state):
        self.run, self.state = run, state

    def on_stop(self, stop, step):
        if isinstance(stop, Interrupted):
            self.after_signal(stop, step)
        else:
            self.after_log_failure(stop, step)

    def after_signal(self, stop, step):
        run, name, latest = self.run, signal.Signals(stop.signum).name, Path(self.run.cfg.out_dir) / LATEST
        rng_states = distributed.all_rng_states(run.world.device, run.world.size)
        where = f"after step {step}" if stop.during is None else f"during {stop.during}"
        if run.cfg.eval_only:
            run.log.print(f"interrupted ({name}) {where}: an --eval_only run saves nothing")
        elif run.saves.last_step == step:
            run.log.print(f"interrupted ({name}) {where}: {latest} holds the state after step {step} already; continue "
                          f"with --init_from=resume")
        elif step == 0 and run.out_dir.set_aside is not None:
            run.log.print(f"interrupted ({name}) {where}: nothing was trained, so nothing was saved")
        else:
            try:
                if run.saves.takes_part:
                    run.saves.save(self.checkpoint(rng_states), improved=False)
            except SecondInterrupt as e:
                raise Aborted(f"aborted by a second interrupt ({e}) while saving the state after step {step}: "
                              f"{run.saves.kept()}", e.signum) from None
            later = "" if stop.during is None or self.state.evaluated else " (its evaluation runs first when it resumes)"
            what = f"saved {latest}" if stop.during is None else f"saved {latest} with the state after step {step}"
            run.log.print(f"interrupted ({name}) {where}: {what}{later}; continue with --init_from=resume")

    def after_log_failure(self, error, step):
        """Several DDP processes save only when all of them stopped for it together (the save's RNG states are a
        collective), and rank 0 says the line."""
        run, world = self.run, self.run.world
        unsaved = step != run.saves.last_step and not run.cfg.eval_only  # rank 0 knows what it saved
        if distributed.agree_with_master(unsaved, world.device, world.size):  # DDP: all are here (Agreement)
            try:
                rng_states = distributed.all_rng_states(world.device, world.size)
                if run.saves.takes_part:
                    run.saves.save(self.checkpoint(rng_states), improved=False)
            except UserError:
                pass  # the disk is full for the checkpoint too: the last one stays as it was
        if not world.master:
            raise FollowerError(str(error)) from None
        kept = (f"saved {Path(run.cfg.out_dir) / LATEST} at step {step}; continue with --init_from=resume once there "
                f"is space" if run.saves.last_step == step and not run.cfg.eval_only else f"{run.saves.kept()}; free "
                f"disk space and continue with --init_from=resume")
        raise UserError(f"{error}: {kept}") from None


def training_line(steps_done, max_iters, rate):
    """'training: 13/5000 steps done, 6.10 s per step' (the rate once two steps are timed)."""
    return f"training: {steps_done}/{max_iters} steps done" + (f", {rate:.2f} s per step" if rate else "")


def evaluation_line(step, done, total, elapsed):
    """'evaluating at step 0: train 15/200 batches, val 0/200 (22s so far, about 9m44s in all)'."""
    batches = sum(done.values())
    whole = f", about {duration(elapsed * 2 * total / batches)} in all" if batches else ""
    return (f"evaluating at step {step}: train {done.get('train', 0)}/{total} batches, val {done.get('val', 0)}/{total} "
            f"({duration(elapsed)} so far{whole})")
