"""Train a GPT.

One process (CPU, one GPU, or Apple MPS):
    python train.py config/train_shakespeare_char.py --max_iters=1000 --out_dir=out-test
Several processes with DDP (gloo on CPU, nccl on CUDA):
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py

Every key of gpt_toolkit.train_config.Config can be set by a config file or --key=value; `python train.py --help`
lists them. main() is the run, top to bottom, in phases; the pieces it calls live in the gpt_toolkit package.
"""
import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from gpt_toolkit.errors import quiet_interrupts

quiet_interrupts()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import format_config
from gpt_toolkit import distributed, hardware, memory
from gpt_toolkit.checkpoint import (
    BEST,
    LATEST,
    RunCheckpoints,
    is_run_dir,
    load_checkpoint,
    restore_training_state,
    resume_path,
    rng_state,
    set_rng_state,
)
from gpt_toolkit.dataset import Dataset, eval_offsets, get_batch, run_batches, step_batches
from gpt_toolkit.diagnostics import GradMonitor, NonFiniteGuard, check_batch, check_init, grad_record_lines
from gpt_toolkit.errors import ConfigError, UserError, import_optional, run_main
from gpt_toolkit.files import atomic_write_text
from gpt_toolkit.outdir import OutDir, check_out_dir
from gpt_toolkit.process import setup_process
from gpt_toolkit.progress import Eta, Heartbeat, StepTimer
from gpt_toolkit.runlog import (
    LogWriteError,
    RunLog,
    TensorBoardTracker,
    WandbTracker,
    duration,
    eval_line,
    iter_line,
    progress_line,
    took_line,
)
from gpt_toolkit.schedule import lr_at
from gpt_toolkit.sharding import local_numel
from gpt_toolkit.stopping import EarlyStopping, Interrupted, StopRequest
from gpt_toolkit.tokenizer import tokenizer_from_meta
from gpt_toolkit.train_config import load_config, validate
from gpt_toolkit.trainer import (
    TrainingModule,
    build_model,
    build_training,
    check_init_tokenizer,
    check_memory,
    check_resume,
    estimate_loss,
    optimizer_step,
    token_byte_lengths,
)


@dataclass
class World:
    """This process's place in the job and what it trains on."""
    rank: int
    local_rank: int
    size: int
    device: str
    dtype: str
    compile: bool

    @property
    def master(self):  # rank 0 logs and writes out_dir
        return self.rank == 0


@dataclass
class Run:
    """What the loop works with, built once: the model and what trains it, where it saves, and what it watches."""
    cfg: object
    world: World
    dataset: Dataset
    model: torch.nn.Module  # the model itself (evaluated, saved); stepper.module is what a training step runs
    vocab_size: int
    training: object  # trainer.Training: optimizer, autocast context, GradScaler
    stepper: TrainingModule
    saves: RunCheckpoints
    guard: NonFiniteGuard
    monitor: GradMonitor | None
    timer: StepTimer
    eta: Eta
    heartbeat: Heartbeat  # a line now and then through evaluations and steps that print nothing for long
    log: RunLog
    doc_sep: int | None  # the end-of-text id attention stops at, with --packing
    byte_lengths: torch.Tensor | None  # UTF-8 bytes per token id, for bits per byte (None: the tokenizer is unknown)
    tokens_per_iter: int


def main(argv):
    # check the config: everything that bad input can break fails here, before anything is written
    cfg, cli_keys = load_config(argv)
    validate(cfg)
    world, trackers = check_setup(cfg)
    setup_process(world.device, keep_cpu_memory=cfg.keep_cpu_memory)
    dataset, ckpt, ckpt_path, notes = check_data_and_out_dir(cfg, cli_keys, world)
    torch.manual_seed(cfg.seed + world.rank)
    model, model_args, model_notes = build_model(cfg, dataset, ckpt)
    check_model_and_data(cfg, dataset, model_args["vocab_size"])

    # build: from here on the run writes to out_dir, which it owns (rank 0 writes) until it ends; Ctrl-C and SIGTERM
    # end a long phase (building, an evaluation, a step's forward and backward) at once, then save (StopRequest)
    with StopRequest(phases=world.size == 1) as stop, OutDir(cfg, writer=world.master) as out_dir, \
            RunLog(cfg.out_dir, append=cfg.init_from == "resume", enabled=world.master, trackers=trackers(),
                   resumed_at=ckpt["iter_num"] if cfg.init_from == "resume" else None) as log:
        distributed.init_process_group(cfg.backend, world.device, world.size)
        try:
            with stop.interruptible():
                run = build_run(cfg, world, dataset, model, model_args, notes + out_dir.notes + model_notes, log)
        except Interrupted as e:
            log.print(f"interrupted ({signal.Signals(e.signum).name}) while building the run: nothing was trained or "
                      f"saved")
            return 128 + e.signum
        run.saves.after_first_save = out_dir.first_save_done
        optimizer, scaler = run.training.optimizer, run.training.scaler

        # resume: the optimizer and GradScaler state, the step, best val loss, early-stopping count and RNG state
        iter_num, best_val_loss, early, saved_rng, evaluated = resume(run, ckpt if cfg.init_from == "resume" else None,
                                                                      ckpt_path)
        resumed_at = iter_num if cfg.init_from == "resume" else None
        del ckpt
        if saved_rng is not None:  # the last thing before the loop, so no setup step draws from the restored state
            set_rng_state(saved_rng, world.device)  # dropout continues exactly where it stopped
        if world.master:
            say_when_sized_for_another_machine(run, iter_num, evaluated)

        exit_code, t_start, estimated = 0, time.time(), False
        advice = lambda: f"{memory.smaller_step_advice(cfg)}; {run.saves.kept()}"
        steps_done, phase, rng_at_step = iter_num, None, None  # what the model holds; what runs; the step's RNG state
        with memory.explain_out_of_memory(lambda: f"at step {iter_num}", advice), \
                save_if_the_log_fails(run, lambda: steps_done, lambda: best_val_loss, early):
            try:
                while True:
                    steps_done = iter_num
                    # evaluate and save: every eval_interval steps and after the last (a resumed run's first step
                    # was evaluated before its save, unless a stop came first)
                    at_eval = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only
                    if at_eval and (iter_num != resumed_at or cfg.eval_only or not evaluated):
                        t_eval, phase = time.time(), f"the evaluation at step {iter_num}"
                        run.guard.check(iter_num, run.saves.kept(), log.print)
                        best_val_loss, stop_early = evaluate_and_save(
                            run, early, stop, iter_num=iter_num, best_val_loss=best_val_loss, t_start=t_start,
                            t_eval=t_eval)
                        if stop_early:
                            log.print(early.message(iter_num, Path(cfg.out_dir) / BEST))
                            break
                        run.timer.leave_out(time.time() - t_eval)
                        run.eta.evaluation_done(t_eval, time.time())
                    if cfg.eval_only or iter_num >= cfg.max_iters:
                        break

                    # step: one optimizer step over the step's micro-batches (forward and backward interruptible)
                    lr = lr_at(cfg, iter_num)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    batches = run_batches(cfg, dataset, iter_num, world.device, rank=world.rank,
                                          world_size=world.size, vocab_size=run.vocab_size)
                    phase = f"iter {iter_num}"
                    rng_at_step = rng_state(world.device) if stop.phases or run.stepper.compiled else None
                    with stop.interruptible():
                        loss = run.stepper.forward_backward(batches, run.training.ctx, scaler, run.doc_sep, iter_num,
                                                            world.device, rng_before=rng_at_step)
                    phase = None
                    scaler.unscale_(optimizer)  # true gradients for the monitor, the guard and clipping
                    grad_record = run.monitor.gradients(iter_num) if run.monitor and run.monitor.due(iter_num) else None
                    norm, skipped = optimizer_step(run.stepper.module, optimizer, scaler, cfg.grad_clip)
                    run.guard.record(loss, norm, skipped)
                    steps_done = iter_num + 1
                    run.timer.step_done()
                    run.eta.step_done(steps_done, time.time())

                    # log: the gradient monitor's record, every log_interval steps the loss, time and MFU, once the
                    # first steps are timed how long the whole run takes, and a line now and then through slow steps
                    if grad_record is not None:
                        log_gradients(run, grad_record, lr)
                    if iter_num % cfg.log_interval == 0:
                        run.guard.check(iter_num, run.saves.kept(), log.print)  # every rank: all stop at one step
                        if world.master:
                            log_step(run, iter_num, loss.item(), lr, steps_in_this_process=iter_num - (resumed_at or 0))
                    if world.master and not estimated and steps_done - (resumed_at or 0) >= 3:
                        estimated = print_whole_run_estimate(run, steps_done)
                    if world.master:
                        run.heartbeat.beat(lambda n=steps_done: training_progress(run, n))
                    iter_num += 1

                    # stop: a Ctrl-C or SIGTERM that came during the optimizer step or the logging (DDP ranks agree
                    # at log steps: a collective)
                    signum = (distributed.largest_signal(stop.signum, world.device, world.size)
                              if world.size == 1 or iter_num % cfg.log_interval == 0 else None)
                    if signum:
                        due = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
                        exit_code = stop_and_save(run, signum, iter_num, best_val_loss, early, evaluated=not due,
                                                  during=None, keep_earlier=out_dir.set_aside is not None)
                        break
            except Interrupted as e:  # a long phase ended by the first signal: save the state after the last whole step
                if phase and phase.startswith("iter") and rng_at_step is not None:
                    set_rng_state(rng_at_step, world.device)  # undo the interrupted step's dropout draws
                exit_code = stop_and_save(run, e.signum, steps_done, best_val_loss, early,
                                          evaluated=not phase or phase.startswith("iter"), during=phase,
                                          keep_earlier=out_dir.set_aside is not None)
        log.print(took_line(time.time() - t_start))
    distributed.destroy_process_group(world.size)
    return exit_code


def stop_and_save(run, signum, step, best_val_loss, early, *, evaluated, during, keep_earlier):
    """Stop for a signal: save the state after `step` steps unless latest.pt holds it already (or nothing was trained
    while --overwrite=True's earlier checkpoints wait to come back), and say exactly what was kept. Returns the exit
    code, 128 + the signal."""
    name, latest = signal.Signals(signum).name, Path(run.cfg.out_dir) / LATEST
    run.guard.check(step, run.saves.kept(), run.log.print)
    rng_states = distributed.all_rng_states(run.world.device, run.world.size)
    where = f"after step {step}" if during is None else f"during {during}"
    if run.saves.last_step == step:
        run.log.print(f"interrupted ({name}) {where}: {latest} holds the state after step {step} already; continue "
                      f"with --init_from=resume")
    elif step == 0 and keep_earlier:
        run.log.print(f"interrupted ({name}) {where}: nothing was trained, so nothing was saved")
    else:
        run.saves.save(step, improved=False, best_val_loss=best_val_loss, early_stop=early.state(), rng_states=rng_states,
                       evaluated=evaluated)
        if during is None:
            run.log.print(f"interrupted ({name}) after step {step}: saved {latest}; continue with --init_from=resume")
        else:
            later = "" if evaluated else " (its evaluation runs first when it resumes)"
            run.log.print(f"interrupted ({name}) during {during}: saved {latest} with the state after step {step}"
                          f"{later}; continue with --init_from=resume")
    return 128 + signum


def print_whole_run_estimate(run, step):
    """Once the first steps are timed: how long the whole run takes on this device, evaluations included (an
    evaluation timed already, else its forward passes at the steps' pace). Returns True once printed."""
    cfg, now = run.cfg, time.time()
    per_eval = run.eta.last_eval if run.eta.last_eval is not None else run.eta.per_step(now) * eval_to_step_ratio(cfg)
    estimate = run.eta.whole_run(step, now, per_eval=per_eval)
    if estimate is None:
        return False
    left, evals = estimate
    run.log.print(f"estimate: about {duration(left)} more on {run.world.device} ({plural(cfg.max_iters - step, 'step')} "
                  f"at {run.eta.per_step(now):.2f} s, {plural(evals, 'evaluation')} at {duration(per_eval)}); ends ~"
                  f"{time.strftime('%H:%M', time.localtime(now + left))}")
    return True


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def eval_to_step_ratio(cfg):
    """An evaluation's cost in training steps: 2 splits x eval_iters forward passes of batch_size rows, a forward a
    third of a training step's work, over gradient_accumulation_steps micro-batches per step."""
    return 2 * cfg.eval_iters / 3 / cfg.gradient_accumulation_steps


def say_when_sized_for_another_machine(run, step, evaluated):
    """On a CPU (or MPS), say in one line at the start when the planned run needs more than ~10 minutes even at the
    device's measured matmul peak, with what the tutorial advises for a CPU. Advice, not a refusal."""
    cfg = run.cfg
    kind = hardware.device_type(run.world.device)
    if kind == "cuda" or cfg.eval_only:
        return
    evals = run.eta.evals_after(step) + (0 if evaluated and step else 1)
    step_flops = run.timer.flops_per_iter * run.world.size
    seconds = (cfg.max_iters - step + evals * eval_to_step_ratio(cfg)) * step_flops / run.timer.peak_flops
    if seconds > 600:
        run.log.print(f"note: this config is sized for a GPU: on {run.world.device} it needs at least {duration(seconds)} "
                      f"({plural(cfg.max_iters - step, 'step')} and {plural(evals, 'evaluation')} of {cfg.eval_iters} "
                      f"batches, at a peak "
                      f"of {run.timer.peak_flops / 1e9:.3g} GFLOP/s: {run.timer.peak_source}); for a CPU the tutorial advises a "
                      f"smaller batch, context, model and eval_iters (ch01 7.1: --batch_size=16 --block_size=64 "
                      f"--n_layer=2 --n_embd=128 --eval_iters=20), or config/train_shakespeare_char_cpu.py")


@contextlib.contextmanager
def save_if_the_log_fails(run, steps_done, best_val_loss, early):
    """A failed write of training.log or metrics.jsonl (a full disk) stops the run the way a failed save does: the
    state is saved if the disk allows and unless it is saved already, and one line says what is on disk."""
    try:
        yield
    except LogWriteError as e:
        step = steps_done()
        if step != run.saves.last_step:
            try:
                run.saves.save(step, improved=False, best_val_loss=best_val_loss(), early_stop=early.state(),
                               rng_states=distributed.all_rng_states(run.world.device, run.world.size))
            except UserError:
                pass  # the disk is full for the checkpoint too: the last one stays as it was
        kept = (f"saved {Path(run.cfg.out_dir) / LATEST} at step {step}; continue with --init_from=resume once there "
                f"is space" if run.saves.last_step == step else f"{run.saves.kept()}; free disk space and continue "
                f"with --init_from=resume")
        raise UserError(f"{e}: {kept}") from None


def check_data_and_out_dir(cfg, cli_keys, world):
    """(the dataset, the checkpoint the model comes from and its path, or None, None; lines for the log): whether
    out_dir may be written, the data, a resume's checkpoint against the config (or the weights of the run init_from
    names, with its tokenizer), and the memory the run needs."""
    notes = check_out_dir(cfg) if world.master else []
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    ckpt = ckpt_path = None
    if cfg.init_from == "resume":
        ckpt_path = resume_path(cfg.out_dir)
        ckpt = load_checkpoint(ckpt_path, map_location=world.device, verify=cfg.verify_checkpoint)
        check_resume(ckpt, cfg, cli_keys, dataset)
    elif is_run_dir(cfg.init_from):  # another run's best weights (its newest when none is best yet)
        ckpt_path = Path(cfg.init_from) / (BEST if (Path(cfg.init_from) / BEST).exists() else LATEST)
        ckpt = load_checkpoint(ckpt_path, verify=cfg.verify_checkpoint)
    check_init_tokenizer(cfg, dataset, ckpt if cfg.init_from != "resume" else None)
    dataset.check_block_size(cfg.block_size)
    if cfg.check_memory:
        check_memory(cfg, dataset, ckpt, world.device, world.dtype, world.size)
    return dataset, ckpt, ckpt_path, notes


def build_run(cfg, world, dataset, model, model_args, notes, log):
    """The model on its device with its optimizer and precision (compiled, in DDP as the run asks), the config.json
    that describes the run, and what the loop saves, guards and times with; the header of the log on the way."""
    log.print("config:\n" + format_config(vars(cfg)))
    for note in notes:
        log.print(note)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    log.print(f"device {world.device}, dtype {world.dtype}, compile {world.compile}, {world.size} process(es); "
              f"tokens per iteration: {tokens_per_iter:,}")
    sharded = cfg.parallel == "fsdp"
    training = build_training(model, cfg, device=world.device, dtype=world.dtype, shard=sharded)
    log.print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    if world.size > 1:  # float32 weights, gradients and AdamW's two moments: 16 bytes per parameter held
        log.print(f"{cfg.parallel}: weights, gradients and AdamW state take {16 * local_numel(model) / 2**20:.1f} MB "
                  f"per process")
    out_dir = Path(cfg.out_dir)
    run_info = dict(vars(cfg), resolved_device=world.device, resolved_dtype=world.dtype, resolved_compile=world.compile,
                    world_size=world.size, num_params=model.get_num_params(), vocab_size=model_args["vocab_size"])

    def compile_failed(cause, step):  # recorded where the run's files describe it
        log.metrics({"type": "compile", "step": step, "compiled": False, "cause": cause})
        if world.master:
            run_info.update(resolved_compile=False, compile_failure=cause)
            atomic_write_text(out_dir / "config.json", json.dumps(run_info, indent=2))

    def wrap(m):  # DDP around the (compiled) model when several processes train it; FSDP shards it itself
        if world.size == 1 or sharded:
            return m
        return DDP(m, device_ids=[world.local_rank] if hardware.device_type(world.device) == "cuda" else None)

    stepper = TrainingModule(model, compile=world.compile, wrap=wrap, report=log.print, on_failure=compile_failed)
    run_info["resolved_compile"] = stepper.compiled
    if world.master:
        atomic_write_text(out_dir / "config.json", json.dumps(run_info, indent=2))
    saves = RunCheckpoints(out_dir, keep_last=cfg.keep_last, writer=world.master, collective=sharded, model=model,
                           optimizer=training.optimizer, scaler=training.scaler, model_args=model_args,
                           config=vars(cfg), meta=dataset.vocabulary, last_step=None, report=log.print)
    peak, source = cfg.peak_flops or 1.0, "--peak_flops"  # only rank 0 logs MFU, so only it measures the peak
    if world.master:
        peak, source = (cfg.peak_flops, "--peak_flops") if cfg.peak_flops else hardware.peak_flops(world.device,
                                                                                                   world.dtype)
        log.print(f"MFU is measured against {peak / 1e12:.2f} TFLOP/s ({source})")
    per_rank_accum = cfg.gradient_accumulation_steps // world.size
    timer = StepTimer(flops_per_iter=model.flops_per_token(cfg.block_size) * cfg.block_size * cfg.batch_size
                      * per_rank_accum, peak_flops=peak, peak_source=source)
    monitor = GradMonitor(model, cfg.grad_monitor_interval) if cfg.grad_monitor_interval and world.master else None
    return Run(cfg=cfg, world=world, dataset=dataset, model=model, vocab_size=model_args["vocab_size"],
               training=training, stepper=stepper, saves=saves, guard=NonFiniteGuard(world.device, training.scaler),
               monitor=monitor, timer=timer, eta=Eta(max_iters=cfg.max_iters, eval_interval=cfg.eval_interval),
               heartbeat=Heartbeat(log.print), log=log,
               doc_sep=dataset.eot_token if cfg.packing else None, tokens_per_iter=tokens_per_iter,
               byte_lengths=token_byte_lengths(dataset.vocabulary, model_args["vocab_size"]) if world.master else None)


def resume(run, ckpt, ckpt_path):
    """(step, best val loss, EarlyStopping, this process's RNG state or None, whether the evaluation due at that step
    has run) to start from: a fresh run's, or the checkpoint's with its optimizer and GradScaler state loaded. Before
    the first step, --debug_data and --check_init look at the data and the model."""
    cfg, world, log = run.cfg, run.world, run.log
    iter_num, best_val_loss, saved_rng, early_state, evaluated = 0, float("inf"), None, None, True
    if ckpt is not None:
        state = restore_training_state(ckpt, optimizer=run.training.optimizer, scaler=run.training.scaler,
                                       rank=world.rank, world_size=world.size)
        iter_num = run.saves.last_step = state["iter_num"]
        best_val_loss, saved_rng, early_state = state["best_val_loss"], state["rng"], state["early_stop"]
        evaluated = state["evaluated"]
        if saved_rng is None:
            log.print(f"the checkpoint has no RNG state for {world.size} process(es): dropout masks will differ "
                      f"from an uninterrupted run")
        log.print(f"resuming from {ckpt_path} at step {iter_num}")
    if world.master and (cfg.debug_data or cfg.check_init):
        check_data_and_init(cfg, run.dataset, run.model, iter_num, world.device, run.training.ctx, run.vocab_size,
                            log.print)
    early = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta, early_state)
    return iter_num, best_val_loss, early, saved_rng, evaluated


def log_step(run, step, loss, lr, *, steps_in_this_process):
    """The iteration's log line and metrics record (rank 0): loss, time per iteration, MFU."""
    dt = run.timer.lap(steps_in_this_process)
    run.log.print(iter_line(step, loss, dt * 1000, run.timer.mfu))
    run.heartbeat.quiet()
    run.log.metrics({"type": "train", "iter": step, "loss": loss, "lr": lr, "time_ms": dt * 1000, "mfu": run.timer.mfu,
                     "tokens_per_s": run.tokens_per_iter / dt})


def log_gradients(run, record, lr):
    record.update(lr=lr, update_ratio=run.monitor.update_ratio())
    run.log.metrics(record)
    for line in grad_record_lines(record):
        run.log.print(line)


def check_setup(cfg):
    """(World, a function that opens the wanted trackers): the optional packages the config needs, this process's
    rank and device, the dtype and compile setting. Raises a one-line error for what cannot work."""
    wandb = import_optional("wandb", "wandb_log=True") if cfg.wandb_log else None
    if cfg.tensorboard_log:
        import_optional("tensorboard", "tensorboard_log=True")
    if cfg.init_from not in ("scratch", "resume"):
        import_optional("transformers", f"init_from={cfg.init_from}")
    rank, local_rank, world_size = distributed.ranks(cfg)
    if cfg.parallel == "fsdp":
        distributed.check_fsdp(cfg, world_size)
    device = hardware.resolve_device(distributed.process_device(cfg.device, local_rank, world_size))
    world = World(rank, local_rank, world_size, device, hardware.resolve_dtype(cfg.dtype, device),
                  hardware.resolve_compile(cfg.compile, device))

    def trackers():  # opened only once out_dir exists, on rank 0
        opened = []
        if world.master and cfg.tensorboard_log:
            opened.append(TensorBoardTracker(cfg.out_dir))
        if world.master and cfg.wandb_log:
            opened.append(WandbTracker(wandb, cfg.wandb_project, cfg.wandb_run_name, vars(cfg)))
        return opened
    return world, trackers


def check_model_and_data(cfg, dataset, vocab_size):
    """The settings that need both the model's vocabulary and the data."""
    dataset.check_token_ids(vocab_size)
    if cfg.mask_token >= vocab_size:
        raise ConfigError(f"mask_token={cfg.mask_token} must be below the model's vocab_size {vocab_size} (or -1 for random)")
    if (cfg.packing or cfg.padding) and dataset.eot_token is None:
        flag = "packing" if cfg.packing else "padding"
        raise UserError(f"{flag}=True needs documents separated by an end-of-text token, and '{cfg.dataset}' has none "
                        f"(character datasets never do): use a GPT-2 tokenized dataset, e.g. data/prepare_text.py "
                        f"--tokenizer=gpt2 on text with <|endoftext|> between documents")
    if dataset.is_chat and not (cfg.padding or cfg.packing):
        raise ConfigError(f"'{cfg.dataset}' is a chat dataset: train on whole conversations with --padding=True (each "
                          f"row one conversation) or --packing=True")


def check_data_and_init(cfg, dataset, model, step, device, ctx, vocab_size, report):
    """--debug_data (a batch decoded, Y checked to be X shifted by one) and --check_init (the fresh model's loss
    against ln(vocab_size)), before the first step."""
    X, Y = step_batches(dataset.splits["train"], step, batch_size=cfg.batch_size, accum_steps=1,
                        block_size=cfg.block_size, seed=cfg.seed, device=device, vocab_size=vocab_size)[0]
    if cfg.debug_data:
        check_batch(X, Y, tokenizer_from_meta(dataset.meta).decode, report)
    if cfg.check_init:
        val = dataset.splits["val"]
        rows = eval_offsets(seed=cfg.seed, split="val", count=cfg.batch_size, split_len=len(val),
                            block_size=cfg.block_size)
        Xv, Yv = get_batch(val, rows, block_size=cfg.block_size, device=device, vocab_size=vocab_size)
        check_init(model, Xv, Yv, dataset.vocab_size or vocab_size, ctx, report)


def training_progress(run, steps_done):
    """'training: 13/5000 steps done, 6.10 s per step' (the rate once two steps are timed)."""
    rate = run.eta.per_step(time.time())
    return f"training: {steps_done}/{run.cfg.max_iters} steps done" + (f", {rate:.2f} s per step" if rate else "")


def evaluation_progress(step, done, total, elapsed):
    """'evaluating at step 0: train 15/200 batches, val 0/200 (22s so far, about 9m44s in all)'."""
    batches = sum(done.values())
    whole = f", about {duration(elapsed * 2 * total / batches)} in all" if batches else ""
    return (f"evaluating at step {step}: train {done.get('train', 0)}/{total} batches, val {done.get('val', 0)}/{total} "
            f"({duration(elapsed)} so far{whole})")


def evaluate_and_save(run, early, stop, *, iter_num, best_val_loss, t_start, t_eval):
    """Evaluate both splits (eagerly: its shapes never cost a recompile), log them, and save when val improved, when
    every evaluation saves, at the end, or when early stopping ends the run. Returns (the best val loss so far,
    whether early stopping ends the run); every rank agrees on the latter."""
    cfg, world, log = run.cfg, run.world, run.log
    rng_states = distributed.all_rng_states(world.device, world.size)
    stop_early = False
    if world.master or cfg.parallel == "fsdp":  # a sharded model's forward takes every process; only rank 0 logs
        done = {}
        run.heartbeat.quiet()

        def progress(split, n, total):  # how far a long evaluation is, now and then (no tutorial regex matches it)
            done[split] = n
            if world.master:
                run.heartbeat.beat(lambda: evaluation_progress(iter_num, done, total, time.time() - t_eval))
        with stop.interruptible():
            losses = estimate_loss(run.model, run.dataset, eval_iters=cfg.eval_iters, batch_size=cfg.batch_size,
                                   block_size=cfg.block_size, seed=cfg.seed, device=world.device, ctx=run.training.ctx,
                                   vocab_size=run.vocab_size, doc_sep=run.doc_sep, padding=cfg.padding,
                                   progress=progress, byte_lengths=run.byte_lengths)
        now = time.time()
        left = run.eta.seconds_left(iter_num, t_eval, now)
        log.print(eval_line(iter_num, losses["train"], losses["val"]))
        run.heartbeat.quiet()
        if not cfg.eval_only and 0 < iter_num < cfg.max_iters:
            log.print(progress_line(iter_num, cfg.max_iters, now - t_start, left, now))
        log.metrics({"type": "eval", "step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                     **{k: losses[k] for k in ("train_bpb", "val_bpb") if k in losses},
                     "lr": lr_at(cfg, iter_num), "elapsed_s": now - t_start, "eta_s": left,
                     "progress": iter_num / cfg.max_iters if cfg.max_iters else 1.0})
        if not all(math.isfinite(v) for v in losses.values()):
            run.guard.stop(iter_num, run.saves.kept(), log.print)
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        stop_early = not cfg.eval_only and early.update(losses["val"], iter_num)
        if not cfg.eval_only and iter_num > 0 and (improved or cfg.always_save_checkpoint
                                                   or iter_num == cfg.max_iters or stop_early):
            run.saves.save(iter_num, improved=improved, best_val_loss=best_val_loss, early_stop=early.state(),
                           rng_states=rng_states)
    if cfg.early_stop_patience:
        stop_early = distributed.agree_with_master(stop_early, world.device, world.size)
    return best_val_loss, stop_early


if __name__ == "__main__":
    run_main(main)
