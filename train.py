"""Train a GPT.

One process (CPU, one GPU, or Apple MPS):
    python train.py config/train_shakespeare_char.py --max_iters=1000 --out_dir=out-test
Several processes with DDP (gloo on CPU, nccl on CUDA):
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py

Every key of train_config.Config can be set by a config file or --key=value; `python train.py --help` lists them.
The pieces live in library modules (trainer, checkpoint, dataset, distributed, stopping, runlog); this script is the
run itself, top to bottom.
"""
import json
import math
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import distributed
import hardware
import memory
from checkpoint import (
    BEST,
    LATEST,
    check_out_dir,
    load_checkpoint,
    open_out_dir,
    restore_training_state,
    resume_path,
    rng_state,
    save_run,
    set_rng_state,
    training_state,
)
from compiling import compile_failure, compile_or_eager
from compiling import warning as compile_warning
from configurator import format_config
from dataset import Dataset, eval_offsets, get_batch, run_batches, step_batches
from diagnostics import NAN_DIAGNOSIS, GradMonitor, check_batch, check_init, grad_record_lines
from errors import ConfigError, UserError, import_optional, run_main
from files import atomic_write_text
from progress import Eta
from runlog import RunLog, TensorBoardTracker, WandbTracker, eval_line, iter_line, progress_line, took_line
from schedule import lr_at
from sharding import local_numel
from stopping import EarlyStopping, StopRequest
from tokenizer import tokenizer_from_meta
from train_config import load_config, validate
from trainer import (
    MAX_SKIPPED_STEPS,
    build_model,
    build_training,
    check_memory,
    check_resume,
    estimate_loss,
    forward_backward,
    optimizer_step,
)


def main(argv):
    # everything that can fail on bad input is checked before anything is written
    cfg, cli_keys = load_config(argv)
    validate(cfg)
    wandb = import_optional("wandb", "wandb_log=True") if cfg.wandb_log else None
    if cfg.tensorboard_log:
        import_optional("tensorboard", "tensorboard_log=True")
    if cfg.init_from not in ("scratch", "resume"):
        import_optional("transformers", f"init_from={cfg.init_from}")
    rank, local_rank, world_size = distributed.ranks(cfg)
    master = rank == 0
    sharded = cfg.parallel == "fsdp"
    if sharded:
        distributed.check_fsdp(cfg, world_size)
    device = hardware.resolve_device(distributed.process_device(cfg.device, local_rank, world_size))
    device_type = hardware.device_type(device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    use_compile = hardware.resolve_compile(cfg.compile, device)
    dataset = Dataset(cfg.data_dir, cfg.dataset, cfg.max_train_tokens)
    ckpt = None
    if cfg.init_from == "resume":
        ckpt_path = resume_path(cfg.out_dir)
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_resume(ckpt, cfg, cli_keys, dataset)
    dataset.check_block_size(cfg.block_size)
    if cfg.check_memory:
        check_memory(cfg, dataset, ckpt, device, dtype, world_size)
    check_out_dir(cfg)
    torch.manual_seed(cfg.seed + rank)
    model, model_args, notes = build_model(cfg, dataset, ckpt)
    vocab_size = model_args["vocab_size"]
    dataset.check_token_ids(vocab_size)
    if cfg.mask_token >= vocab_size:
        raise ConfigError(f"mask_token={cfg.mask_token} must be below the model's vocab_size {vocab_size} (or -1 for random)")
    doc_sep = dataset.eot_token if cfg.packing else None
    if cfg.packing or cfg.padding:
        if dataset.eot_token is None:
            flag = "packing" if cfg.packing else "padding"
            raise UserError(f"{flag}=True needs documents separated by an end-of-text token, and '{cfg.dataset}' has none "
                            f"(character datasets never do): use a GPT-2 tokenized dataset, e.g. data/prepare_text.py "
                            f"--tokenizer=gpt2 on text with <|endoftext|> between documents")

    # from here on the run writes to out_dir
    if master:
        open_out_dir(cfg)
    distributed.init_process_group(cfg.backend, device, world_size)
    trackers = []
    if master and cfg.tensorboard_log:
        trackers.append(TensorBoardTracker(cfg.out_dir))
    if master and cfg.wandb_log:
        trackers.append(WandbTracker(wandb, cfg.wandb_project, cfg.wandb_run_name, vars(cfg)))
    log = RunLog(cfg.out_dir, append=cfg.init_from == "resume", enabled=master, trackers=trackers)
    log.print("config:\n" + format_config(vars(cfg)))
    for note in notes:
        log.print(note)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    log.print(f"device {device}, dtype {dtype}, compile {use_compile}, {world_size} process(es); "
              f"tokens per iteration: {tokens_per_iter:,}")
    training = build_training(model, cfg, device=device, dtype=dtype, shard=sharded)
    optimizer, ctx, scaler = training.optimizer, training.ctx, training.scaler
    log.print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    if world_size > 1:  # float32 weights, gradients and AdamW's two moments: 16 bytes per parameter held
        log.print(f"{cfg.parallel}: weights, gradients and AdamW state take {16 * local_numel(model) / 2**20:.1f} MB "
                  f"per process")
    iter_num, best_val_loss, resumed_at, saved_rng, early_state = 0, float("inf"), None, None, None
    if ckpt is not None:
        state = restore_training_state(ckpt, optimizer=optimizer, scaler=scaler, rank=rank, world_size=world_size)
        iter_num = resumed_at = state["iter_num"]
        best_val_loss, saved_rng, early_state = state["best_val_loss"], state["rng"], state["early_stop"]
        if saved_rng is None:
            log.print(f"the checkpoint has no RNG state for {world_size} process(es): dropout masks will differ "
                      f"from an uninterrupted run")
        log.print(f"resuming from {ckpt_path} at step {iter_num}")
    del ckpt
    early = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta, early_state)
    raw_model = model

    def training_module(m):  # DDP around the (compiled) model when several processes train it
        return DDP(m, device_ids=[local_rank] if device_type == "cuda" else None) if world_size > 1 and not sharded else m

    compiled = raw_model
    if use_compile:
        log.print("compiling the model... (takes a minute)")
        compiled, use_compile = compile_or_eager(raw_model, log.print, "training")
    model = training_module(compiled)
    eval_model = raw_model  # evaluated eagerly: its shapes never cost a recompile (or a compile failure)
    out_dir = Path(cfg.out_dir)
    run_info = dict(vars(cfg), resolved_device=device, resolved_dtype=dtype, resolved_compile=use_compile,
                    world_size=world_size, num_params=raw_model.get_num_params(), vocab_size=vocab_size)
    if master:
        atomic_write_text(out_dir / "config.json", json.dumps(run_info, indent=2))

    def compile_failed(cause, step):
        """torch.compile failed at this step: say so once, record it, and train eagerly from here on."""
        log.print(compile_warning(cause, "training"))
        log.metrics({"type": "compile", "step": step, "compiled": False, "cause": cause})
        if master:
            run_info.update(resolved_compile=False, compile_failure=cause)
            atomic_write_text(out_dir / "config.json", json.dumps(run_info, indent=2))
        optimizer.zero_grad(set_to_none=True)  # whatever the failed attempt accumulated
        return training_module(raw_model)
    peak = cfg.peak_flops or 1.0  # only rank 0 logs MFU, so only it measures the peak
    if master:
        peak, peak_source = (cfg.peak_flops, "--peak_flops") if cfg.peak_flops else hardware.peak_flops(device, dtype)
        log.print(f"MFU is measured against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    per_rank_accum = cfg.gradient_accumulation_steps // world_size
    flops_per_iter = raw_model.flops_per_token(cfg.block_size) * cfg.block_size * cfg.batch_size * per_rank_accum
    train_data = dataset.splits["train"]

    last_saved = {"step": resumed_at}

    def save(step, improved, rng_states):
        """Rank 0 writes; under FSDP every process calls this, since gathering the shards takes them all."""
        state = training_state(model=raw_model, optimizer=optimizer, scaler=scaler, model_args=model_args, iter_num=step,
                               best_val_loss=best_val_loss, config=vars(cfg), rng_states=rng_states,
                               early_stop=early.state(), meta=dataset.meta)
        if not master:
            return
        written = save_run(state, out_dir, improved=improved, keep_last=cfg.keep_last)
        last_saved["step"] = step
        log.print(f"saving checkpoint to {cfg.out_dir} ({', '.join(written)})")

    def kept_checkpoint():
        return (f"the last checkpoint ({out_dir / LATEST}, step {last_saved['step']}) is from before and untouched"
                if last_saved["step"] is not None else "no checkpoint had been saved yet")

    def stop_for_nonfinite(step):
        """The NaN/Inf guard: stop before anything broken is evaluated or saved, with the tutorial's diagnosis."""
        log.print(f"training stopped: the loss or the gradients became NaN/Inf by step {step}")
        if scaler.is_enabled() and skipped_in_a_row.item():
            log.print(f"float16: the GradScaler skipped the last {skipped_in_a_row.item()} steps for inf/NaN gradients")
        log.print(NAN_DIAGNOSIS)
        log.close()
        raise UserError(f"loss or gradients became NaN/Inf by step {step}: {kept_checkpoint()}; see the likely causes "
                        f"above (lower learning_rate, set grad_clip, avoid float16)")

    def out_of_memory_advice():
        return f"{memory.smaller_step_advice(cfg)}; {kept_checkpoint()}"

    if master and (cfg.debug_data or cfg.check_init):
        X, Y = step_batches(train_data, iter_num, batch_size=cfg.batch_size, accum_steps=1, block_size=cfg.block_size,
                            seed=cfg.seed, device=device, vocab_size=vocab_size)[0]
        if cfg.debug_data:
            check_batch(X, Y, tokenizer_from_meta(dataset.meta).decode, log.print)
        if cfg.check_init:
            val = dataset.splits["val"]
            rows = eval_offsets(seed=cfg.seed, split="val", count=cfg.batch_size, split_len=len(val),
                                block_size=cfg.block_size)
            Xv, Yv = get_batch(val, rows, block_size=cfg.block_size, device=device, vocab_size=vocab_size)
            check_init(raw_model, Xv, Yv, dataset.vocab_size or vocab_size, ctx, log.print)
    monitor = GradMonitor(raw_model, cfg.grad_monitor_interval) if cfg.grad_monitor_interval and master else None
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # set by any step whose loss or gradient is NaN/Inf
    skipped_in_a_row = torch.zeros((), dtype=torch.long, device=device)  # float16 steps the GradScaler skipped

    if saved_rng is not None:
        # the last thing before the loop, so no setup step can draw from the restored state
        set_rng_state(saved_rng, device)  # dropout continues exactly where it stopped
    exit_code = 0
    t_start = time.time()
    t_window, window_iters, running_mfu = time.time(), 0, -1.0
    eta = Eta(max_iters=cfg.max_iters, eval_interval=cfg.eval_interval)
    with StopRequest() as stop, memory.explain_out_of_memory(lambda: f"at step {iter_num}", out_of_memory_advice):
        while True:
            at_eval = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only
            if at_eval and (iter_num != resumed_at or cfg.eval_only):  # a resumed step was evaluated before its save
                t_eval = time.time()
                if nonfinite.item():
                    stop_for_nonfinite(iter_num)
                rng_states = distributed.all_rng_states(device, world_size)
                stop_early = False
                if master or sharded:  # a sharded model's forward takes every process; only rank 0 logs
                    losses = estimate_loss(eval_model, dataset, eval_iters=cfg.eval_iters, batch_size=cfg.batch_size,
                                           block_size=cfg.block_size, seed=cfg.seed, device=device, ctx=ctx,
                                           vocab_size=vocab_size, doc_sep=doc_sep, padding=cfg.padding)
                    now = time.time()
                    left = eta.seconds_left(iter_num, t_eval, now)
                    log.print(eval_line(iter_num, losses["train"], losses["val"]))
                    if not cfg.eval_only and 0 < iter_num < cfg.max_iters:
                        log.print(progress_line(iter_num, cfg.max_iters, now - t_start, left, now))
                    log.metrics({"type": "eval", "step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "lr": lr_at(cfg, iter_num), "elapsed_s": now - t_start, "eta_s": left,
                                 "progress": iter_num / cfg.max_iters if cfg.max_iters else 1.0})
                    if not all(math.isfinite(v) for v in losses.values()):
                        stop_for_nonfinite(iter_num)
                    improved = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])
                    stop_early = not cfg.eval_only and early.update(losses["val"], iter_num)
                    if not cfg.eval_only and iter_num > 0 and (improved or cfg.always_save_checkpoint
                                                               or iter_num == cfg.max_iters or stop_early):
                        save(iter_num, improved, rng_states)
                if cfg.early_stop_patience:
                    stop_early = distributed.agree_with_master(stop_early, device, world_size)
                if stop_early:
                    log.print(early.message(iter_num, out_dir / BEST))
                    break
                t_window += time.time() - t_eval  # keep evaluation out of the iteration time
                eta.evaluation_done(t_eval, time.time())
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break
            lr = lr_at(cfg, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = run_batches(cfg, dataset, iter_num, device, rank=rank, world_size=world_size, vocab_size=vocab_size)
            rng_before = rng_state(device) if use_compile else None
            try:
                loss = forward_backward(model, batches, ctx, scaler, doc_sep)
            except Exception as e:
                cause = compile_failure(e) if use_compile else None
                if cause is None:
                    raise
                model, use_compile = compile_failed(cause, iter_num), False
                set_rng_state(rng_before, device)  # the eager redo draws the dropout masks an eager run would
                loss = forward_backward(model, batches, ctx, scaler, doc_sep)
            scaler.unscale_(optimizer)  # true gradients for the monitor, the guard and clipping (no-op unless float16)
            grad_record = monitor.gradients(iter_num) if monitor and monitor.due(iter_num) else None
            norm, skipped = optimizer_step(model, optimizer, scaler, cfg.grad_clip)
            finite = torch.isfinite(loss)
            if skipped is not None:  # float16: the scaler skips an inf-gradient step; only a long run of them is fatal
                skipped_in_a_row = (skipped_in_a_row + 1) * skipped
                finite &= skipped_in_a_row < MAX_SKIPPED_STEPS
            elif norm is not None:
                finite &= torch.isfinite(norm)
            nonfinite |= ~finite
            if grad_record is not None:
                grad_record.update(lr=lr, update_ratio=monitor.update_ratio())
                log.metrics(grad_record)
                for line in grad_record_lines(grad_record):
                    log.print(line)
            window_iters += 1
            eta.step_done(iter_num + 1, time.time())
            if iter_num % cfg.log_interval == 0:
                if nonfinite.item():  # every rank checks here, so all of them stop at the same step
                    stop_for_nonfinite(iter_num)
                if master:
                    lossf = loss.item()  # the one host sync per logged step
                    dt = (time.time() - t_window) / window_iters
                    t_window, window_iters = time.time(), 0
                    if iter_num - (resumed_at or 0) >= 5:  # let the first iterations (allocation, compilation) pass
                        mfu = flops_per_iter / dt / peak
                        running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
                    log.print(iter_line(iter_num, lossf, dt * 1000, running_mfu))
                    log.metrics({"type": "train", "iter": iter_num, "loss": lossf, "lr": lr, "time_ms": dt * 1000,
                                 "mfu": running_mfu, "tokens_per_s": tokens_per_iter / dt})
            iter_num += 1
            # DDP ranks must agree on stopping; that costs a collective and a host sync, so only at log steps
            signum = (distributed.largest_signal(stop.signum, device, world_size)
                      if world_size == 1 or iter_num % cfg.log_interval == 0 else None)
            if signum:
                if nonfinite.item():
                    stop_for_nonfinite(iter_num)
                rng_states = distributed.all_rng_states(device, world_size)
                if master or sharded:
                    save(iter_num, False, rng_states)
                log.print(f"interrupted ({signal.Signals(signum).name}) after step {iter_num}: saved {out_dir / LATEST}; "
                          f"continue with --init_from=resume")
                exit_code = 128 + signum
                break

    log.print(took_line(time.time() - t_start))
    log.close()
    distributed.destroy_process_group(world_size)
    return exit_code


if __name__ == "__main__":
    run_main(main)
