"""The training step as users run it, timed: train.py's own loop (its main(), which a tool imports and hands to
train_in_process) run in this process with a StepClock guard that clocks its steps and ends the run once it has seen
enough. tools/bench.py, tools/estimate.py, tools/experiment.py, tools/gpu_check.py and tools/lr_finder.py measure or
drive training this way, so there is one step sequence: the loop's."""
import contextlib
import dataclasses
import io
import tempfile
import time
from pathlib import Path

from gpt_toolkit.core import hardware
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.training.guards import Guard
from gpt_toolkit.training.progress import flops_per_step


class Enough(Exception):
    """A StepClock has seen the steps it was asked for: the run ends here, before any later evaluation or save."""


class StepClock(Guard):
    """Clocks each step of the loop (device synchronized): seconds from the end of the previous step (or of the
    evaluation before the first) to the end of this one's logging, so a step's batch, update and logging are all in
    it. Records each step's loss and learning rate (a host sync per step, as nanoGPT's log line makes), and with
    measure_memory the peak memory: `peak` bytes above `memory_before`, what the process held when the steps began
    (or, with train_in_process's memory="whole_run", when the run began; on CPU: Linux's resident set). Ends the run
    after `steps` steps; stop(step, loss) returning True ends it sooner. The run's model and timer are seen in start."""

    def __init__(self, steps=None, *, measure_memory=False, memory_before=None):
        self.steps, self.measure_memory, self.memory_before = steps, measure_memory, memory_before
        self.seconds, self.losses, self.lrs = [], [], []
        self.peak = self.clock = self.device = None

    def start(self, run, state):
        self.device, self.flops_per_iter = run.world.device, flops_per_step(run.model, run.cfg, run.world.size)

    def evaluated(self, step, losses, lr):
        hardware.synchronize(self.device)
        if self.measure_memory and self.memory_before is None:  # the steps begin: the model and its data are there
            self.memory_before = hardware.memory_in_use(self.device)
            hardware.reset_peak_memory(self.device)
        self.clock = time.perf_counter()

    def after_step(self, step, loss, norm, lr):
        self.losses.append(loss.item())
        self.lrs.append(lr)
        hardware.synchronize(self.device)
        self.seconds.append(time.perf_counter() - self.clock)
        if self.measure_memory:
            self.peak = hardware.peak_memory(self.device) - self.memory_before
        if len(self.seconds) >= self.steps or self.stop(step + 1, self.losses[-1]):
            raise Enough
        self.clock = time.perf_counter()

    def stop(self, step, loss):
        """True ends the run after `step` steps (loss: the last step's)."""
        return False


def train_in_process(main, cfg, *, steps, clock=None, memory=None, keep_init=False):
    """Run train.py's main (the tool imports train and passes train.main) with Config `cfg` for `steps` steps in this
    process (its output hidden, out_dir a temporary directory, one evaluation batch), clocked by `clock`, a StepClock
    (a fresh one when None). Returns the clock. A bad config is train.py's one-line UserError; a Ctrl-C, a
    KeyboardInterrupt. memory: None, or the peak memory from "steps" (what the steps add to the model and data) or the
    "whole_run" (from before train.py builds the model). The model is a fresh one unless keep_init: then cfg's
    init_from (fine-tuning, LoRA)."""
    device = hardware.resolve_device(cfg.device)
    clock = clock or StepClock()
    clock.steps, clock.measure_memory = steps, memory is not None
    if memory == "whole_run":
        clock.memory_before = hardware.memory_in_use(device)
        hardware.reset_peak_memory(device)
    if hardware.resolve_compile(cfg.compile, device):
        import torch._dynamo
        torch._dynamo.reset()  # each run compiles a new model: the last run's graphs count against dynamo's limit
    with tempfile.TemporaryDirectory(prefix="gpt-toolkit-timing-") as tmp:
        init_from = cfg.init_from if keep_init else "scratch"
        cfg = dataclasses.replace(cfg, out_dir=str(Path(tmp) / "out"), init_from=init_from, eval_iters=1,
                                  eval_interval=max(cfg.max_iters, steps) + 1, max_iters=max(cfg.max_iters, steps),
                                  log_interval=max(cfg.max_iters, steps) + 1, overwrite=False, eval_only=False,
                                  wandb_log=False, tensorboard_log=False, keep_last=0)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(config_argv(cfg), guards=[clock])
        except Enough:
            return clock
        if code > 128:  # a Ctrl-C or SIGTERM stopped it (and saved into the temporary directory)
            raise KeyboardInterrupt
        raise UserError(f"training stopped after {len(clock.seconds)} of {steps} steps (exit code {code}): run "
                        f"train.py with this config to see why")


def config_argv(cfg):
    """--key=value arguments that give train.py exactly this Config."""
    return [f"--{field.name}={getattr(cfg, field.name)!r}" for field in dataclasses.fields(cfg)]


def timed_steps(main, cfg, *, steps):
    """Seconds of each of `steps` training steps of a fresh model with cfg (its batches, optimizer, precision), as
    train.py's main takes them. The first pays for allocation."""
    return train_in_process(main, cfg, steps=steps).seconds
