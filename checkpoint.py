"""Checkpoint files: nanoGPT's layout, written atomically, read without arbitrary pickle.

A checkpoint is a dict with nanoGPT's keys
    model          state_dict (nanoGPT's parameter names)
    optimizer      AdamW state_dict
    model_args     n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout
    iter_num       optimizer steps completed
    best_val_loss  best val loss seen so far
    config         the run's full config
so nanoGPT's train.py/sample.py load ours and we load theirs. Extra keys (scaler, RNG states)
are ignored by nanoGPT.
"""
import os
import pickle
import zipfile
from pathlib import Path

import torch

from errors import UserError

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts in front of parameter names


def save_checkpoint(ckpt, path):
    """Write to a temp file in the same directory, fsync, then rename over path: a crash at any
    moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True; a missing or damaged file is a UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train one first (init_from=scratch) or check --out_dir")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
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
