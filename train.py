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
    load_checkpoint,
    restore_training_state,
    resume_path,
    set_rng_state,
)
from gpt_toolkit.dataset import Dataset, eval_offsets, get_batch, run_batches, step_batches
from gpt_toolkit.diagnostics import GradMonitor, NonFiniteGuard, check_batch, check_init, grad_record_lines
from gpt_toolkit.errors import ConfigError, UserError, import_optional, run_main
from gpt_toolkit.files import atomic_write_text
from gpt_toolkit.outdir import OutDir, check_out_dir
from gpt_toolkit.process import setup_process
from gpt_toolkit.progress import Eta, StepTimer
from gpt_toolkit.runlog import (
    LogWriteError,
    RunLog,
    TensorBoardTracker,
    WandbTracker,
    eval_line,
    iter_line,
    progress_line,
    took_line,
)
from gpt_toolkit.schedule import lr_at
from gpt_toolkit.sharding import local_numel
from gpt_toolkit.stopping import EarlyStopping, StopRequest
from gpt_toolkit.tokenizer import tokenizer_from_meta
from gpt_toolkit.train_config import load_config, validate
from gpt_toolkit.trainer import (
    TrainingModule,
    build_model,
    build_training,
    check_memory,
    check_resume,
    estimate_loss,
    optimizer_step,
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
    log: RunLog
    doc_sep: int | None  # the end-of-text id attention stops at, with --packing
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

    # build: from here on the run writes to out_dir, which it owns (rank 0 writes) until it ends
    with OutDir(cfg, writer=world.master) as out_dir, \
            RunLog(cfg.out_dir, append=cfg.init_from == "resume", enabled=world.master, trackers=trackers(),
                   resumed_at=ckpt["iter_num"] if ckpt is not None else None) as log:
        distributed.init_process_group(cfg.backend, world.device, world.size)
        run = build_run(cfg, world, dataset, model, model_args, notes + out_dir.notes + model_notes, log)
        run.saves.after_first_save = out_dir.first_save_done
        optimizer, scaler = run.training.optimizer, run.training.scaler

        # resume: the optimizer and GradScaler state, the step, best val loss, early-stopping count and RNG state
        iter_num, best_val_loss, early, saved_rng = resume(run, ckpt, ckpt_path)
        resumed_at = iter_num if ckpt is not None else None
        del ckpt
        if saved_rng is not None:  # the last thing before the loop, so no setup step draws from the restored state
            set_rng_state(saved_rng, world.device)  # dropout continues exactly where it stopped

        exit_code, t_start = 0, time.time()
        advice = lambda: f"{memory.smaller_step_advice(cfg)}; {run.saves.kept()}"
        steps_done = iter_num  # what the model holds: iter_num steps, or iter_num + 1 once a step has updated it
        with StopRequest() as stop, memory.explain_out_of_memory(lambda: f"at step {iter_num}", advice), \
                save_if_the_log_fails(run, lambda: steps_done, lambda: best_val_loss, early):
            while True:
                steps_done = iter_num
                # evaluate and save: every eval_interval steps and after the last (a resumed step was evaluated)
                at_eval = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only
                if at_eval and (iter_num != resumed_at or cfg.eval_only):
                    t_eval = time.time()
                    run.guard.check(iter_num, run.saves.kept(), log.print)
                    best_val_loss, stop_early = evaluate_and_save(run, early, iter_num=iter_num,
                                                                  best_val_loss=best_val_loss, t_start=t_start, t_eval=t_eval)
                    if stop_early:
                        log.print(early.message(iter_num, Path(cfg.out_dir) / BEST))
                        break
                    run.timer.leave_out(time.time() - t_eval)
                    run.eta.evaluation_done(t_eval, time.time())
                if cfg.eval_only or iter_num >= cfg.max_iters:
                    break

                # step: one optimizer step over the step's micro-batches
                lr = lr_at(cfg, iter_num)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batches = run_batches(cfg, dataset, iter_num, world.device, rank=world.rank, world_size=world.size,
                                      vocab_size=run.vocab_size)
                loss = run.stepper.forward_backward(batches, run.training.ctx, scaler, run.doc_sep, iter_num, world.device)
                scaler.unscale_(optimizer)  # true gradients for the monitor, the guard and clipping (no-op unless float16)
                grad_record = run.monitor.gradients(iter_num) if run.monitor and run.monitor.due(iter_num) else None
                norm, skipped = optimizer_step(run.stepper.module, optimizer, scaler, cfg.grad_clip)
                run.guard.record(loss, norm, skipped)
                steps_done = iter_num + 1
                run.timer.step_done()
                run.eta.step_done(iter_num + 1, time.time())

                # log: the gradient monitor's record, and every log_interval steps the loss, time and MFU
                if grad_record is not None:
                    log_gradients(run, grad_record, lr)
                if iter_num % cfg.log_interval == 0:
                    run.guard.check(iter_num, run.saves.kept(), log.print)  # on every rank: all stop at the same step
                    if world.master:
                        log_step(run, iter_num, loss.item(), lr, steps_in_this_process=iter_num - (resumed_at or 0))
                iter_num += 1

                # stop: Ctrl-C or SIGTERM saves this step and exits (DDP ranks agree at log steps: a collective)
                signum = (distributed.largest_signal(stop.signum, world.device, world.size)
                          if world.size == 1 or iter_num % cfg.log_interval == 0 else None)
                if signum:
                    run.guard.check(iter_num, run.saves.kept(), log.print)
                    run.saves.save(iter_num, improved=False, best_val_loss=best_val_loss, early_stop=early.state(),
                                   rng_states=distributed.all_rng_states(world.device, world.size))
                    log.print(f"interrupted ({signal.Signals(signum).name}) after step {iter_num}: saved "
                              f"{Path(cfg.out_dir) / LATEST}; continue with --init_from=resume")
                    exit_code = 128 + signum
                    break
        log.print(took_line(time.time() - t_start))
    distributed.destroy_process_group(world.size)
    return exit_code


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
    """(the dataset, the checkpoint a resume continues and its path, or None, None; lines for the log): whether
    out_dir may be written, the data, a resume's checkpoint against the config, and the memory the run needs."""
    notes = check_out_dir(cfg) if world.master else []
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    ckpt = ckpt_path = None
    if cfg.init_from == "resume":
        ckpt_path = resume_path(cfg.out_dir)
        ckpt = load_checkpoint(ckpt_path, map_location=world.device, verify=cfg.verify_checkpoint)
        check_resume(ckpt, cfg, cli_keys, dataset)
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
    peak = cfg.peak_flops or 1.0  # only rank 0 logs MFU, so only it measures the peak
    if world.master:
        peak, source = (cfg.peak_flops, "--peak_flops") if cfg.peak_flops else hardware.peak_flops(world.device,
                                                                                                   world.dtype)
        log.print(f"MFU is measured against {peak / 1e12:.2f} TFLOP/s ({source})")
    per_rank_accum = cfg.gradient_accumulation_steps // world.size
    timer = StepTimer(flops_per_iter=model.flops_per_token(cfg.block_size) * cfg.block_size * cfg.batch_size
                      * per_rank_accum, peak_flops=peak)
    monitor = GradMonitor(model, cfg.grad_monitor_interval) if cfg.grad_monitor_interval and world.master else None
    return Run(cfg=cfg, world=world, dataset=dataset, model=model, vocab_size=model_args["vocab_size"],
               training=training, stepper=stepper, saves=saves, guard=NonFiniteGuard(world.device, training.scaler),
               monitor=monitor, timer=timer, eta=Eta(max_iters=cfg.max_iters, eval_interval=cfg.eval_interval), log=log,
               doc_sep=dataset.eot_token if cfg.packing else None, tokens_per_iter=tokens_per_iter)


def resume(run, ckpt, ckpt_path):
    """(step, best val loss, EarlyStopping, this process's RNG state or None) to start from: a fresh run's, or the
    checkpoint's with its optimizer and GradScaler state loaded. Before the first step, --debug_data and
    --check_init look at the data and the model."""
    cfg, world, log = run.cfg, run.world, run.log
    iter_num, best_val_loss, saved_rng, early_state = 0, float("inf"), None, None
    if ckpt is not None:
        state = restore_training_state(ckpt, optimizer=run.training.optimizer, scaler=run.training.scaler,
                                       rank=world.rank, world_size=world.size)
        iter_num = run.saves.last_step = state["iter_num"]
        best_val_loss, saved_rng, early_state = state["best_val_loss"], state["rng"], state["early_stop"]
        if saved_rng is None:
            log.print(f"the checkpoint has no RNG state for {world.size} process(es): dropout masks will differ "
                      f"from an uninterrupted run")
        log.print(f"resuming from {ckpt_path} at step {iter_num}")
    if world.master and (cfg.debug_data or cfg.check_init):
        check_data_and_init(cfg, run.dataset, run.model, iter_num, world.device, run.training.ctx, run.vocab_size,
                            log.print)
    return iter_num, best_val_loss, EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta, early_state), saved_rng


def log_step(run, step, loss, lr, *, steps_in_this_process):
    """The iteration's log line and metrics record (rank 0): loss, time per iteration, MFU."""
    dt = run.timer.lap(steps_in_this_process)
    run.log.print(iter_line(step, loss, dt * 1000, run.timer.mfu))
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


def evaluate_and_save(run, early, *, iter_num, best_val_loss, t_start, t_eval):
    """Evaluate both splits (eagerly: its shapes never cost a recompile), log them, and save when val improved, when
    every evaluation saves, at the end, or when early stopping ends the run. Returns (the best val loss so far,
    whether early stopping ends the run); every rank agrees on the latter."""
    cfg, world, log = run.cfg, run.world, run.log
    rng_states = distributed.all_rng_states(world.device, world.size)
    stop_early = False
    if world.master or cfg.parallel == "fsdp":  # a sharded model's forward takes every process; only rank 0 logs
        losses = estimate_loss(run.model, run.dataset, eval_iters=cfg.eval_iters, batch_size=cfg.batch_size,
                               block_size=cfg.block_size, seed=cfg.seed, device=world.device, ctx=run.training.ctx,
                               vocab_size=run.vocab_size, doc_sep=run.doc_sep, padding=cfg.padding)
        now = time.time()
        left = run.eta.seconds_left(iter_num, t_eval, now)
        log.print(eval_line(iter_num, losses["train"], losses["val"]))
        if not cfg.eval_only and 0 < iter_num < cfg.max_iters:
            log.print(progress_line(iter_num, cfg.max_iters, now - t_start, left, now))
        log.metrics({"type": "eval", "step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
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
