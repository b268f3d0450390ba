"""Checkpoint files: nanoGPT's layout, written atomically, read without arbitrary pickle.

In out_dir:
    ckpt.pt             the model with the lowest val loss so far (nanoGPT's name: its sample.py finds it)
    latest.pt           the newest saved state; init_from=resume continues from it
    ckpt_stepNNNNNNNN.pt  rolling copies of the last --keep_last saves
Each is a dict with nanoGPT's keys
    model          state_dict (nanoGPT's parameter names)
    optimizer      AdamW state_dict
    model_args     n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout
    iter_num       optimizer steps completed
    best_val_loss  best val loss seen so far
    config         the run's full config
so nanoGPT's train.py/sample.py load ours and we load theirs. nanoGPT ignores our extra keys: scaler
(GradScaler state), rng (one RNG state per DDP rank), sampler (where batch sampling continues), meta
(the vocabulary, so sampling needs no data directory).
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from errors import UserError

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias")  # what a resume may not change
COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts in front of parameter names
BEST = "ckpt.pt"  # the lowest val loss so far (nanoGPT's file name, so its sample.py finds the best model)
LATEST = "latest.pt"  # the newest saved state: what init_from=resume continues from


def step_name(step):
    """File name of the rolling checkpoint kept for step (with --keep_last)."""
    return f"ckpt_step{step:08d}.pt"


def resume_path(out_dir):
    """The checkpoint a resume continues from: latest.pt, else ckpt.pt (an out_dir written by nanoGPT)."""
    out_dir = Path(out_dir)
    for name in (LATEST, BEST):
        if (out_dir / name).exists():
            return out_dir / name
    raise UserError(f"no checkpoint in {out_dir} (looked for {LATEST} and {BEST}): check --out_dir, "
                    f"or start a new run with --init_from=scratch")


def existing_checkpoints(out_dir):
    out_dir = Path(out_dir)
    return sorted(p for p in out_dir.glob("*.pt") if p.name in (BEST, LATEST) or p.name.startswith("ckpt_step"))


def _temp_name(path):
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temps(out_dir):
    """Delete temp files left by a write that was killed part-way (never read: the rename never happened)."""
    for p in Path(out_dir).glob(".*.pt.tmp*"):
        p.unlink(missing_ok=True)


def save_checkpoint(ckpt, path):
    """Write to a temp file in the same directory, fsync, then rename over path: a crash at any
    moment leaves either the old file or the new one, never a torn one. A failed write (disk full)
    leaves the old file untouched and is reported as a UserError."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not save the checkpoint to {path} ({e.strerror or e}): the previous checkpoint is "
                        f"intact; free disk space and continue with --init_from=resume") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def link_checkpoint(src, dst):
    """Make dst the same file as src (a hard link, or a copy where links are not supported), atomically."""
    src, dst = Path(src), Path(dst)
    tmp = _temp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {dst} ({e.strerror or e}): {src} holds the same checkpoint") from None
    _fsync_dir(dst.parent)


def _fsync_dir(directory):
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True; a missing or damaged file is a UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train one first (init_from=scratch) or check --out_dir")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # an unpickler fed damaged bytes can raise nearly anything (IndexError, OverflowError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({first[:160]}): "
                        f"resume from another checkpoint or train again") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a nanoGPT-style checkpoint (no 'model'/'model_args'): check the path")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def clean_state_dict(state):
    """Strip torch.compile's prefix and the causal-mask buffers that older nanoGPT versions saved."""
    out = {}
    for k, v in state.items():
        if k.startswith(COMPILED_PREFIX):
            k = k[len(COMPILED_PREFIX):]
        if k.endswith(".attn.bias") and v.dim() == 4:  # a (1, 1, T, T) mask, not a parameter
            continue
        out[k] = v
    return out


def rng_state(device):
    """This process's random-number state (torch, CUDA, numpy, python) in types weights_only loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
