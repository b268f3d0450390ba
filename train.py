"""Train a GPT: nanoGPT's train.py, made robust.

One process (CPU, one GPU, or Apple MPS):
    python train.py config/train_shakespeare_char.py --max_iters=1000 --out_dir=out-test
Several processes with DDP (gloo on CPU, nccl on CUDA):
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py

It reads in nanoGPT's order, under nanoGPT's names (tutorial ch03 walks through it line by line): the config, the
setup, the model, the optimizer, then train(): get_batch, estimate_loss, get_lr and the training loop. What a robust
run adds (Ctrl-C and SIGTERM, exact resume, the NaN/Inf guard, torch.compile's fallback, timing, DDP's agreement) is
one line each in the loop, behind its guards (gpt_toolkit/training/guards.py). docs/train_py.md maps the tutorial's walkthrough
to this file. Every key of gpt_toolkit.core.config.Config can be set by a config file or --key=value;
`python train.py --help` lists them.
"""
import dataclasses
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import defaults_of, format_config, format_config_summary
from gpt_toolkit.core import hardware
from gpt_toolkit.core.config import Config, load_config, validate, validate_lora
from gpt_toolkit.core.errors import ConfigError, UserError, import_optional, run_main
from gpt_toolkit.core.files import write_run_file
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.core.tokenizer import tokenizer_from_meta
from gpt_toolkit.data import dataset as datasets
from gpt_toolkit.data.dataset import BatchPlan, Dataset, eval_offsets
from gpt_toolkit.models import lora, memory, sharding
from gpt_toolkit.models.checkpoint import RunCheckpoints, TrainingState, load_optimizer_state, set_rng_state
from gpt_toolkit.models.sharding import local_numel
from gpt_toolkit.models.source import ModelSource
from gpt_toolkit.serving.task_scoring import EvalTasks
from gpt_toolkit.training import distributed, evaluation
from gpt_toolkit.training.diagnostics import check_batch, check_init
from gpt_toolkit.training.evaluation import token_byte_lengths
from gpt_toolkit.training.guards import CompileFallback, guards_for
from gpt_toolkit.training.init_from import build_model, check_init_tokenizer, check_memory, check_resume, resume_differences
from gpt_toolkit.training.outdir import OutDir, check_out_dir
from gpt_toolkit.training.progress import StepTimer, flops_per_step
from gpt_toolkit.training.runlog import (
    LogWriteError,
    RunLog,
    TensorBoardTracker,
    WandbTracker,
    eval_line,
    took_line,
    total_time_line,
)
from gpt_toolkit.training.schedule import Schedule
from gpt_toolkit.training.setup import Training, build_training
from gpt_toolkit.training.stopping import Interrupted, StopRequest


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
    """What the loop trains and where it saves, built once (build_run)."""
    cfg: Config
    world: World
    dataset: Dataset
    model: torch.nn.Module  # the model itself: evaluated and saved (a step runs the guards' module: compiled, in DDP)
    model_args: dict  # GPTConfig's fields, as nanoGPT's checkpoints hold them
    training: Training  # its optimizer, the autocast context, the GradScaler
    saves: RunCheckpoints
    log: RunLog
    out_dir: OutDir
    batches: BatchPlan  # this process's share of each step's rows: batch size, context, accumulation, seed, masking
    schedule: Schedule  # the learning rate of each step


def main(argv, *, guards=()):
    """The run, top to bottom. guards: a tool's or a test's own guards.Guard objects, called after the run's own at
    each of the loop's points (where they time steps, observe them, or put a fault). Returns the exit code."""
    # config: the defaults, then config files, then --key=value (tutorial ch01); everything that bad input can break
    # fails here in one line, before anything is written
    cfg, cli_keys = load_config(argv)
    validate(cfg)
    source = ModelSource.for_training(cfg)  # init_from, resolved once: scratch, resume, a run, a transformers dir, gpt2*
    world, trackers = check_setup(cfg, source)  # the DDP process, its device, dtype (auto: bf16 where fast), compile
    setup_process(world.device, keep_cpu_memory=cfg.keep_cpu_memory, compile=world.compile)
    cfg, dataset, ckpt, ckpt_path, notes = check_data_and_out_dir(cfg, source, cli_keys, world)
    tasks = EvalTasks(cfg.eval_tasks, cfg.eval_tasks_limit, dataset.meta) if cfg.eval_tasks and world.master else None
    torch.manual_seed(cfg.seed + world.rank)

    # model init: from scratch, from a checkpoint to resume, from another run, GPT-2 or a transformers directory
    model, model_args, model_notes = build_model(cfg, source, dataset, ckpt)
    if not source.resumes:
        ckpt = None  # another run's weights are in the model now: their copy in the file's dict is freed
    check_model_and_data(cfg, dataset, model_args["vocab_size"])

    # from here on the run writes to out_dir, which it owns (rank 0 writes) until it ends; Ctrl-C and SIGTERM end a
    # long phase (building, an evaluation, a step's forward and backward) at once, then the run saves
    resuming = source.resumes
    with StopRequest(phases=world.size == 1) as stop, OutDir(cfg, source, writer=world.master) as out_dir, \
            RunLog(cfg.out_dir, append=resuming, enabled=world.master, trackers=trackers(cfg),
                   resumed_at=ckpt["iter_num"] if resuming else None, defer_failures=world.size > 1) as log:
        distributed.init_process_group(cfg.backend, world.device, world.size)
        try:
            with stop.interruptible():
                run, compiled, timer = build_run(cfg, world, dataset, model, model_args, log=log, out_dir=out_dir,
                                                 notes=notes + out_dir.notes + model_notes, command=(argv, cli_keys))
        except Interrupted as e:
            log.print(f"interrupted ({signal.Signals(e.signum).name}) while building the run: nothing was trained or "
                      f"saved")
            return 128 + e.signum
        state = resume(run, ckpt if resuming else None, ckpt_path)
        del ckpt
        if world.master and (cfg.debug_data or cfg.check_init):
            check_data_and_init(run, state.iter_num)
        if state.rng is not None:  # the last thing before the loop, so no setup step draws from the restored state
            set_rng_state(state.rng, world.device)  # dropout continues exactly where it stopped
        # the loop's guards: the NaN/Inf guard, timing and its log lines, --eval_tasks, early stopping, DDP's
        # agreement on a stop, the saver (gpt_toolkit/training/guards.py), then the tool's or test's own
        guards = guards_for(cfg, world, stop=stop, compiled=compiled, timer=timer, tasks=tasks, extra=guards,
                            checkpoint=lambda rng_states: checkpoint(run, state, rng_states))
        guards.start(run, state)

        t_start = state.part_started = time.time()
        advice = lambda: f"{memory.smaller_step_advice(cfg)}; {run.saves.kept()}"
        with memory.explain_out_of_memory(lambda: f"at step {state.iter_num}", advice):
            try:
                exit_code = train(run, state, guards)
                guards.end()  # early stopping's line; DDP: rank 0's log failed after the last agreed step
            except (Interrupted, LogWriteError) as stop_reason:  # a signal or a full disk: the saver saves what it can
                exit_code = guards.on_stop(stop_reason)
        log.print(took_line(time.time() - t_start))
        if state.seconds_before:  # a resumed run: the summary's Time counts every part
            log.print(total_time_line(state.seconds()))
    distributed.destroy_process_group(world.size)
    if log.failed:  # DDP: a line after the loop (a stop's, the time's) could not be written; every process is done
        raise log.failed
    return exit_code


def train(run, state, guards):
    """nanoGPT's training loop (tutorial ch03) from the step in state on, state kept current; returns 0 when done (a
    signal's stop is raised, for main's saver). The guards (gpt_toolkit/training/guards.py) run at named points."""
    cfg, world, log, dataset = run.cfg, run.world, run.log, run.dataset
    optimizer, scaler, ctx = run.training.optimizer, run.training.scaler, run.training.ctx
    master_process, fsdp, ddp = world.master, cfg.parallel == "fsdp", world.size > 1 and cfg.parallel == "ddp"
    gradient_accumulation_steps = cfg.gradient_accumulation_steps // world.size  # this process's share of them
    doc_sep = dataset.eot_token if cfg.packing else None  # packed documents: attention stops at each one's end
    byte_lengths = token_byte_lengths(dataset.vocabulary, run.model_args["vocab_size"]) if master_process else None

    def get_batch(split, it):
        """This process's micro-batches [(X, Y), ...] of rows of `split` for optimizer step `it`, Y the rows of X
        shifted by one token (tutorial ch02). nanoGPT draws rows at random; these are a function of (seed, it) alone:
        a resumed run trains on the very batches an uninterrupted one would, and 64 x 1 rows are those of 16 x 4."""
        return run.batches.step(dataset, split, it, padding=cfg.padding)

    def estimate_loss():
        """The mean loss of each split over the same eval_iters batches at every evaluation (and the bits per byte),
        the model in eval mode: no dropout, no gradients."""
        with guards.evaluation(state.iter_num) as progress:  # Ctrl-C ends it at once
            return evaluation.eval_losses(run.model, dataset, cfg, device=world.device, ctx=ctx,
                                          vocab_size=run.model_args["vocab_size"], byte_lengths=byte_lengths,
                                          progress=progress)

    def get_lr(it):
        """The learning rate of step `it`: linear warmup, then cosine decay to min_lr (or the schedule cfg names)."""
        return run.schedule.lr(it)

    while True:
        iter_num = state.iter_num

        # determine and set the learning rate for this iteration
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr

        # evaluate the loss on train/val sets and write checkpoints when owed (every eval_interval steps, after the last)
        if not state.evaluated or cfg.eval_only:
            rng_states = distributed.all_rng_states(world.device, world.size)  # for the checkpoint (a collective)
            losses = estimate_loss() if master_process or fsdp else None  # FSDP: its forward takes every process
            state.evaluated = True  # what is saved from now on holds this evaluation
            if losses is not None:
                log.print(eval_line(iter_num, losses["train"], losses["val"]))
            stop = guards.evaluated(iter_num, losses, lr)  # the metrics, NaN/Inf, --eval_tasks, early stopping
            if losses is not None:
                improved = losses["val"] < state.best_val_loss
                state.best_val_loss = min(state.best_val_loss, losses["val"])
                if not cfg.eval_only and iter_num > 0 and (improved or cfg.always_save_checkpoint
                                                           or iter_num == cfg.max_iters or stop):
                    run.saves.save(checkpoint(run, state, rng_states), improved=improved)
            if stop:
                return 0
        if cfg.eval_only or iter_num >= cfg.max_iters:
            return 0

        # forward backward update, with gradient accumulation to simulate a larger batch (tutorial ch03 steps 1-5)
        micro_batches = get_batch("train", iter_num)
        train_loss = torch.zeros((), device=world.device)  # the step's mean loss, for the log
        with guards.step(iter_num) as attempt:  # compiled and in DDP as asked; Ctrl-C ends the step at once
            model = attempt.module
            for micro_step, (X, Y) in enumerate(micro_batches):
                if ddp:  # average the gradients across processes in the last micro-step's backward only
                    model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
                if fsdp:  # likewise for FSDP's sharded gradients
                    model.set_requires_gradient_sync(micro_step == gradient_accumulation_steps - 1)
                with ctx:  # autocast: bfloat16 or float16 matmuls where the run's dtype asks for them
                    logits, loss = model(X, Y, doc_sep)
                    # the micro-steps' gradients add up: dividing makes their sum the gradient of one big batch
                    loss = loss / gradient_accumulation_steps
                # backward pass; in float16 the scaler multiplies the loss first, so small gradients do not underflow
                scaler.scale(loss).backward()
                train_loss += loss.detach()
        if attempt.redo:  # torch.compile failed in that step: it runs again, eagerly, from the same state
            continue
        # clip the gradient: unscale it first, so that grad_clip bounds the true gradient (tutorial ch03 step 4)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip != 0.0 else None
        # step the optimizer and the scaler (float16: the scaler skips a step whose gradients overflowed)
        scaler.step(optimizer)
        scaler.update()
        # flush the gradients as soon as we can, no need for this memory anymore
        optimizer.zero_grad(set_to_none=True)
        state.iter_num, state.evaluated = iter_num + 1, not evaluation_due(cfg, iter_num + 1)  # what a save now holds

        # timing and logging: the NaN/Inf guard, 'iter N: loss X, time Yms, mfu Z%' every log_interval steps, the
        # estimate; a signal's stop after this whole step (every DDP process agrees on the step)
        stop = guards.after_step(iter_num, train_loss, norm, lr)
        if stop:
            raise stop


def evaluation_due(cfg, step):
    """Whether the loop evaluates (and saves) at `step`: every eval_interval steps, and after the last."""
    return step % cfg.eval_interval == 0 or step == cfg.max_iters


def checkpoint(run, state, rng_states):
    """What a save writes: nanoGPT's keys (its train.py resumes from them and its sample.py samples from them; from a
    LoRA run's once tools/merge_lora.py has merged it), then
    ours, which nanoGPT ignores: the GradScaler's state, the vocabulary, and the rest of the training state (every
    process's RNG state, early stopping's count, whether the evaluation at iter_num ran). A LoRA run's 'model' is its
    adapters only, and 'lora' names the base they fit (gpt_toolkit/models/lora.py)."""
    model_state, optimizer_state = sharding.state_dicts(run.model, run.training.optimizer)  # FSDP: gathers shards
    adapters = getattr(run.model, "lora", None)  # a LoRA run saves its adapters, and names the base they fit
    return {
        "model": lora.adapters_only(model_state) if adapters else model_state,
        "optimizer": optimizer_state,
        "model_args": run.model_args,
        "iter_num": state.iter_num,
        "best_val_loss": state.best_val_loss,
        "config": dataclasses.asdict(run.cfg),
        "scaler": run.training.scaler.state_dict(),
        "meta": run.dataset.vocabulary,
        **({"lora": adapters} if adapters else {}),
        **state.saved(rng_states=rng_states, seed=run.cfg.seed),  # rng, sampler, early_stop, evaluated
    }


def check_data_and_out_dir(cfg, source, cli_keys, world):
    """(cfg, the dataset, the checkpoint the model comes from and its path, or None, None; lines for the log):
    whether out_dir may be written, the data, a resume's checkpoint against the config (cfg comes back with its
    architecture), or the weights of the run init_from names with its tokenizer, and the memory the run needs."""
    notes = check_out_dir(cfg, source) if world.master else []
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    if dataset.is_chat and not (cfg.padding or cfg.packing):  # a row must not start mid-conversation
        cfg = dataclasses.replace(cfg, padding=True)
        notes.append(f"'{cfg.dataset}' is a chat dataset: each row is one whole conversation, padded (--padding=True; "
                     f"--packing=True packs them instead)")
    # a resume's latest.pt, or another run's best weights (its newest when none is best yet)
    ckpt, ckpt_path = source.load_checkpoint(map_location=world.device if source.resumes else "cpu",
                                             verify=cfg.verify_checkpoint, optimizer=source.resumes)
    if source.resumes:
        notes += resume_differences(ckpt, cfg)  # the command's settings that change the run it continues
        cfg = check_resume(ckpt, cfg, cli_keys, dataset)
        validate_lora(cfg)  # the run's own LoRA settings, as the checkpoint gives them
    check_init_tokenizer(cfg, source, dataset, ckpt if not source.resumes else None)
    dataset.check_block_size(cfg.block_size)
    if cfg.check_memory:
        check_memory(cfg, source, dataset, ckpt, world)
    return cfg, dataset, ckpt, ckpt_path, notes


def build_run(cfg, world, dataset, model, model_args, *, notes, log, out_dir, command):
    """(Run, its CompileFallback, its StepTimer): the model on its device with its optimizer and precision, compiled
    and in DDP as the run asks, the config.json that describes the run, and what the loop saves with; the header of
    the log on the way (command: the command line and the keys it gave as --key=value, for the config's lines)."""
    config = dataclasses.asdict(cfg)  # every key in training.log; on screen what the command line set or is not a default
    log.print("config:\n" + format_config(config), screen=format_config_summary(
        config, defaults_of(Config), *command, full_at=Path(cfg.out_dir) / "training.log"))
    for note in notes:
        log.print(note)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    log.print(f"device {world.device}, dtype {world.dtype}, compile {world.compile}, {world.size} process(es); "
              f"tokens per iteration: {tokens_per_iter:,}")
    if note := hardware.dtype_note(world.dtype, world.device):
        log.print(note)
    sharded = cfg.parallel == "fsdp"
    # the model on its device, with its optimizer (AdamW, or Muon), autocast context and GradScaler (float16)
    training = build_training(model, cfg, device=world.device, dtype=world.dtype, shard=sharded)
    log.print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    if getattr(model, "lora", None):  # only the adapters have gradients and optimizer state
        trained, total = lora.trainable_count(model), sum(p.numel() for p in model.parameters())
        log.print(f"LoRA: {trained:,} of {total:,} parameters train ({100 * trained / total:.2f}%)")
    if world.size > 1:  # float32 weights, gradients and AdamW's two moments: 16 bytes per parameter held
        log.print(f"{cfg.parallel}: weights, gradients and AdamW state take {16 * local_numel(model) / 2**20:.1f} MB "
                  f"per process")
    out_path = Path(cfg.out_dir)
    run_info = dict(dataclasses.asdict(cfg), resolved_device=world.device, resolved_dtype=world.dtype,
                    resolved_compile=world.compile, world_size=world.size, num_params=model.get_num_params(),
                    vocab_size=model_args["vocab_size"])

    def compile_failed(cause, step):  # recorded where the run's files describe it
        log.metrics({"type": "compile", "step": step, "compiled": False, "cause": cause})
        if world.master and not cfg.eval_only:
            run_info.update(resolved_compile=False, compile_failure=cause)
            write_run_file(out_path / "config.json", json.dumps(run_info, indent=2))

    def wrap(m):  # DDP around the (compiled) model when several processes train it; FSDP shards it itself
        if world.size == 1 or sharded:
            return m
        # its only buffers (rotary tables) are the same in every process: no broadcast of them at every forward
        return DDP(m, device_ids=[world.local_rank] if hardware.device_type(world.device) == "cuda" else None,
                   broadcast_buffers=False)

    peak, source = cfg.peak_flops or 1.0, "--peak_flops"  # only rank 0 logs MFU, so only it measures the peak
    if world.master and not cfg.peak_flops:
        peak, source = hardware.peak_flops(world.device, world.dtype)
    compiled = CompileFallback(model, compile=world.compile, wrap=wrap, log=log, on_failure=compile_failed)
    timer = StepTimer(flops_per_iter=flops_per_step(model, cfg, world.size), peak_flops=peak, peak_source=source)
    if world.master:
        log.print(f"MFU is measured against {hardware.flops_text(peak)} ({source})")
    run_info["resolved_compile"] = compiled.compiling
    if world.master and not cfg.eval_only:  # an evaluation leaves the trained run's description as it is
        write_run_file(out_path / "config.json", json.dumps(run_info, indent=2))
    saves = RunCheckpoints(out_path, keep_last=cfg.keep_last, writer=world.master, collective=sharded,
                           report=log.print, after_first_save=out_dir.first_save_done)
    batches = BatchPlan.of(cfg, device=world.device, rank=world.rank, world_size=world.size,
                           vocab_size=model_args["vocab_size"])
    return Run(cfg=cfg, world=world, dataset=dataset, model=model, model_args=model_args, training=training,
               saves=saves, log=log, out_dir=out_dir, batches=batches, schedule=Schedule.of(cfg)), compiled, timer


def resume(run, ckpt, ckpt_path):
    """The TrainingState to start from: a fresh run's, or the checkpoint's, with its optimizer and GradScaler state
    loaded."""
    if ckpt is None:
        return TrainingState()
    world, log = run.world, run.log
    load_optimizer_state(ckpt, optimizer=run.training.optimizer, scaler=run.training.scaler)
    state = TrainingState.restored(ckpt, rank=world.rank, world_size=world.size)
    run.saves.last_step = state.iter_num
    if state.rng is None:
        log.print(f"the checkpoint has no RNG state for {world.size} process(es): dropout masks will differ from an "
                  f"uninterrupted run")
    log.print(f"resuming from {ckpt_path} at step {state.iter_num}")
    if state.iter_num >= run.cfg.max_iters and state.evaluated and not run.cfg.eval_only:
        log.print(f"the run is done: it is at step {state.iter_num}, max_iters={run.cfg.max_iters}; to train further, "
                  f"resume with a larger --max_iters (e.g. --max_iters={2 * max(state.iter_num, 1)}, and "
                  f"--lr_decay_iters to match)")
    return state


def check_setup(cfg, source):
    """(World, a function that opens the wanted trackers): the optional packages the config needs, this process's
    rank and device, the dtype and compile setting. Raises a one-line error for what cannot work."""
    wandb = import_optional("wandb", "wandb_log=True") if cfg.wandb_log else None
    if cfg.tensorboard_log:
        import_optional("tensorboard", "tensorboard_log=True")
    if source.fine_tunes:
        import_optional("transformers", f"init_from={source}")
    rank, local_rank, world_size = distributed.ranks(cfg)
    if cfg.parallel == "fsdp":
        distributed.check_fsdp(cfg, world_size)
    device = hardware.resolve_device(distributed.process_device(cfg.device, local_rank, world_size))
    world = World(rank, local_rank, world_size, device, hardware.resolve_dtype(cfg.dtype, device, training=True),
                  hardware.resolve_compile(cfg.compile, device))

    def trackers(cfg):  # opened only once out_dir exists, on rank 0, with the run's config (a resume's)
        opened = []
        if world.master and cfg.tensorboard_log:
            opened.append(TensorBoardTracker(cfg.out_dir))
        if world.master and cfg.wandb_log:
            opened.append(WandbTracker(wandb, cfg.wandb_project, cfg.wandb_run_name, dataclasses.asdict(cfg)))
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


def check_data_and_init(run, step):
    """--debug_data (a batch decoded, Y checked to be X shifted by one) and --check_init (the fresh model's loss
    against ln(vocab_size)), before the first step."""
    cfg, device, vocab_size, dataset = run.cfg, run.world.device, run.model_args["vocab_size"], run.dataset
    X, Y = BatchPlan(cfg.batch_size, cfg.block_size, seed=cfg.seed, device=device, vocab_size=vocab_size).rows(
        dataset.splits["train"], step)[0]
    if cfg.debug_data:
        check_batch(X, Y, tokenizer_from_meta(dataset.meta).decode, run.log.print)
    if cfg.check_init:
        val = dataset.splits["val"]
        rows = eval_offsets(seed=cfg.seed, split="val", count=cfg.batch_size, split_len=len(val),
                            block_size=cfg.block_size)
        Xv, Yv = datasets.batch_at(val, rows, block_size=cfg.block_size, device=device, vocab_size=vocab_size)
        check_init(run.model, Xv, Yv, dataset.vocab_size or vocab_size, run.training.ctx, run.log.print)


if __name__ == "__main__":
    run_main(main)
