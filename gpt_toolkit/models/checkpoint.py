"""Checkpoint files: nanoGPT's layout, written atomically, read without arbitrary pickle.

In out_dir:
    ckpt.pt             the model with the lowest val loss so far (nanoGPT's name: its sample.py finds it)
    latest.pt           the newest saved state; init_from=resume continues from it
    ckpt_stepNNNNNNNN.pt  rolling copies of the last --keep_last saves
Each is a dict with nanoGPT's keys
    model          state_dict (nanoGPT's parameter names)
    optimizer      AdamW state_dict
    model_args     n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout (and any model option turned on:
                   model.MODEL_OPTIONS; a default model's model_args are nanoGPT's, which its GPTConfig takes)
    iter_num       optimizer steps completed
    best_val_loss  best val loss seen so far
    config         the run's full config
so nanoGPT's train.py/sample.py load ours and we load theirs. nanoGPT ignores our extra keys: scaler
(GradScaler state), rng (one RNG state per DDP rank), sampler (where batch sampling continues), meta
(the vocabulary, so sampling needs no data directory), evaluated (False when a stop came before the evaluation due
at iter_num: a resume runs it), and checksum: the sha256 of everything else in the file (every
tensor's bytes, every value), checked on load, so a file whose bytes changed after it was written (a disk or copy
error) is refused instead of resumed or sampled.
"""
import difflib
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import UserError, first_line, interrupt_behind, short
from gpt_toolkit.core.files import atomic_write, fsync_dir, temp_path, write_failure_cause
from gpt_toolkit.core.process import release_pages
from gpt_toolkit.core.system import mapped_ranges
from gpt_toolkit.core.tokenizer import check_meta
from gpt_toolkit.models import sharding
from model import MODEL_OPTIONS, model_options

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", *MODEL_OPTIONS)  # what a resume may not change

COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts in front of parameter names
BEST = "ckpt.pt"  # the lowest val loss so far (nanoGPT's file name, so its sample.py finds the best model)
LATEST = "latest.pt"  # the newest saved state: what init_from=resume continues from
CHECKSUM = "checksum"  # {"sha256": hex} of the rest of the checkpoint (state_checksum)
SET_ASIDE = "gpt-toolkit-set-aside"  # .replaced.<pid>.gpt-toolkit-set-aside/: what --overwrite=True replaces (outdir)


def model_args_of(config):
    """A GPTConfig's model_args for a checkpoint: nanoGPT's keys, plus the model options it turns on (so nanoGPT's
    GPTConfig(**model_args) still takes a default model's)."""
    return {**{k: getattr(config, k) for k in MODEL_ARGS}, **model_options(config)}


def architecture(model_args, key):
    """model_args[key], an option's off value where the checkpoint does not name it (nanoGPT's, or one saved before
    the option existed)."""
    return model_args.get(key, MODEL_OPTIONS.get(key))


def step_name(step):
    """File name of the rolling checkpoint kept for step (with --keep_last)."""
    return f"ckpt_step{step:08d}.pt"


def resume_path(out_dir):
    """The checkpoint a resume continues from: latest.pt, else ckpt.pt (an out_dir written by nanoGPT)."""
    out_dir = Path(out_dir)
    if out_dir.suffix == ".pt" and out_dir.is_file():
        raise UserError(f"--out_dir={out_dir} is a checkpoint file: pass its directory, --out_dir={out_dir.parent}")
    for name in (LATEST, BEST):
        if (out_dir / name).exists():
            return out_dir / name
    raise UserError(f"no checkpoint in {out_dir} (looked for {LATEST} and {BEST}){nearby_runs(out_dir)}: check "
                    f"--out_dir, or start a new run with --init_from=scratch")


def is_run_dir(path):
    """A training run's out_dir: a directory with ckpt.pt or latest.pt (it has a config.json too, not a transformers
    one)."""
    return Path(path).is_dir() and any((Path(path) / name).is_file() for name in (BEST, LATEST))


def is_hf_dir(path):
    """A transformers model directory: a config.json with its model_type. Not a run's out_dir, which has a config.json
    of its own (and no checkpoint yet when it stopped before its first save)."""
    config = Path(path) / "config.json"
    if not Path(path).is_dir() or not config.is_file() or is_run_dir(path):
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):  # unreadable, or not a JSON object: not a transformers config
        return False


def run_checkpoint(out_dir, checkpoint=BEST):
    """The checkpoint file a reader (sample, evaluate, export) loads: out_dir/checkpoint, or out_dir itself when it is
    a checkpoint file. A missing out_dir is a one-line error naming the runs beside it."""
    out_dir = Path(out_dir)
    if out_dir.is_file() and out_dir.suffix == ".pt":
        return out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out_dir '{out_dir}' is a file, not a run's directory (or a .pt checkpoint): pass the "
                        f"--out_dir you trained with")
    if not out_dir.is_dir():
        raise UserError(f"out_dir '{out_dir}' does not exist{nearby_runs(out_dir)}: pass the --out_dir you trained "
                        f"with")
    path = out_dir / checkpoint
    if not path.exists() and checkpoint == BEST and (out_dir / LATEST).exists():
        raise UserError(f"no {checkpoint} in {out_dir} (no evaluation improved on the first yet): use the newest "
                        f"state with --checkpoint={LATEST}")
    if not path.exists() and existing_checkpoints(out_dir):
        names = ", ".join(p.name for p in existing_checkpoints(out_dir))
        raise UserError(f"no {checkpoint} in {out_dir} (its checkpoints: {names}): pass one of them to --checkpoint")
    return path


def nearby_runs(out_dir):
    """' (runs beside it: a, b)': the directories next to out_dir that hold a checkpoint, the closest names first."""
    parent = Path(out_dir).parent
    try:
        runs = sorted(p.name for p in parent.iterdir() if p.is_dir() and existing_checkpoints(p))
    except OSError:
        return ""
    if not runs:
        return ""
    close = difflib.get_close_matches(Path(out_dir).name, runs, n=3, cutoff=0.5)
    shown = close + [r for r in runs if r not in close][:max(0, 5 - len(close))]
    where = "" if str(parent) == "." else f" in {parent}"
    return f" (runs{where}: {', '.join(shown)}{', ...' if len(runs) > len(shown) else ''})"


def existing_checkpoints(out_dir):
    out_dir = Path(out_dir)
    return sorted(p for p in out_dir.glob("*.pt") if p.name in (BEST, LATEST) or p.name.startswith("ckpt_step"))


def state_checksum(ckpt, mapped=()):
    """sha256 of a checkpoint's contents but its checksum: every tensor's dtype, shape and bytes, every other value's
    repr, dict keys in a fixed order. The same before saving and after loading with weights_only. mapped: the
    memory mappings of the file the tensors were loaded from (system.mapped_ranges): each tensor's pages are given
    back once hashed, so verifying does not hold the whole file in memory."""
    h = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
            if mapped:
                release_pages(t, mapped)
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)};".encode())
            for key in sorted(obj, key=repr):
                h.update(f"{key!r}:".encode())
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)};".encode())
            for item in obj:
                feed(item)
        else:
            h.update(f"{obj!r};".encode())
    feed({k: v for k, v in ckpt.items() if k != CHECKSUM})
    return h.hexdigest()


RESUME_AFTER_FAILURE = "the previous checkpoint is intact; free disk space and continue with --init_from=resume"


def save_checkpoint(ckpt, path, *, after_failure=RESUME_AFTER_FAILURE):
    """Write whole or not at all (files.atomic_write), with its checksum. A failed write (a full disk, a file-size
    limit) leaves the old file untouched and is reported as a UserError, ending with after_failure (what is kept,
    and what to do)."""
    path = Path(path)
    weights = {k: v for k, v in ckpt.items() if k != "optimizer"}  # what a reader loads: it is verified on its own
    ckpt = {**ckpt, CHECKSUM: {"sha256": state_checksum(ckpt), "weights_sha256": state_checksum(weights)}}
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        interrupt = interrupt_behind(e)  # a second Ctrl-C inside torch's writer comes out as its RuntimeError
        if interrupt is not None:
            raise interrupt from None
        if isinstance(e, RuntimeError) and not _write_failure(e):
            raise
        raise UserError(f"could not save the checkpoint to {path} ({write_failure_cause(e, path)}): "
                        f"{after_failure}") from None


def save_weights(path, model_state, *, model_args, meta, config,
                 after_failure="nothing was kept; free disk space or write it elsewhere", **extra):
    """A checkpoint of weights only, no optimizer (so not resumable): nanoGPT's keys, which its sample.py, our readers
    and init_from=DIR read (iter_num 0 and best_val_loss inf unless extra gives them). What a LoRA merge and a
    benchmark's base write."""
    save_checkpoint({"model": model_state, "model_args": model_args, "iter_num": 0, "best_val_loss": float("inf"),
                     "config": config, "meta": meta, **extra}, path, after_failure=after_failure)


def _write_failure(exc):
    """A RuntimeError from torch.save that means the file could not be written."""
    text = str(exc)
    return "inline_container" in text or "file write failed" in text or "unexpected pos" in text


def link_checkpoint(src, dst):
    """Make dst the same file as src (a hard link, or a copy where links are not supported), atomically."""
    src, dst = Path(src), Path(dst)
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {dst} ({e.strerror or e}): {src} holds the same checkpoint") from None
    fsync_dir(dst.parent)


@dataclass
class TrainingState:
    """Where a run is, beyond its weights and optimizer: what a checkpoint saves and a resume restores whole.
    iter_num: optimizer steps done; best_val_loss: the lowest val loss evaluated; evaluated: no evaluation is owed at
    iter_num (False when one is due there and has not run, e.g. a stop cut it short: a resume runs it first);
    early_stop: EarlyStopping's count; rng: this process's RNG state to continue from (None: a fresh run's);
    seconds_before: the training time of the parts of the run before this one (to their last save); part_started:
    when this part's training began (time.time()), set by train.py."""
    iter_num: int = 0
    best_val_loss: float = math.inf
    evaluated: bool = False
    early_stop: dict = field(default_factory=dict)
    rng: dict | None = None
    seconds_before: float = 0.0
    part_started: float | None = None

    def seconds(self):
        """The run's training time so far, over every part."""
        return self.seconds_before + (time.time() - self.part_started if self.part_started is not None else 0.0)

    def saved(self, *, rng_states, seed):
        """This state's checkpoint keys beyond nanoGPT's iter_num and best_val_loss (rng_states: every process's RNG
        state, in rank order)."""
        return {"rng": rng_states, "sampler": {"kind": "seed_and_step", "seed": seed, "next_step": self.iter_num},
                "early_stop": self.early_stop, "evaluated": self.evaluated, "train_seconds": self.seconds()}

    @classmethod
    def restored(cls, ckpt, *, rank, world_size):
        """The state a checkpoint holds, with process `rank`'s RNG state (None when it has none for this many
        processes: nanoGPT's checkpoints, another world size)."""
        rng = ckpt.get("rng")
        seconds = ckpt.get("train_seconds")
        return cls(iter_num=ckpt["iter_num"], best_val_loss=float(ckpt["best_val_loss"]),
                   evaluated=ckpt.get("evaluated", True), early_stop=dict(ckpt.get("early_stop") or {}),
                   rng=rng[rank] if rng and len(rng) == world_size else None,
                   seconds_before=float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else 0.0)


def load_optimizer_state(ckpt, *, optimizer, scaler):
    """A resumed run's optimizer and GradScaler state."""
    sharding.load_optimizer_state(optimizer, ckpt["optimizer"])  # cut into shards under FSDP
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])


def save_run(state, out_dir, *, improved, keep_last):
    """A run's save: latest.pt always; ckpt.pt (a link to it) only when val improved; with keep_last, a rolling
    ckpt_stepNNNNNNNN.pt and the older ones beyond keep_last removed. Returns the names written."""
    out_dir = Path(out_dir)
    save_checkpoint(state, out_dir / LATEST)
    written = [LATEST]
    if improved:
        link_checkpoint(out_dir / LATEST, out_dir / BEST)
        written.append(BEST)
    if keep_last:
        link_checkpoint(out_dir / LATEST, out_dir / step_name(state["iter_num"]))
        for old in sorted(out_dir.glob("ckpt_step*.pt"))[:-keep_last]:
            old.unlink()
    return written


class RunCheckpoints:
    """A run's saves into out_dir, and what a run that stops early can say about them. Every process calls save at
    the same step; the writer (rank 0) writes, and with collective=True (FSDP) every process takes part in building
    the checkpoint (gathering the shards takes them all): `takes_part` says whether this one builds it."""

    def __init__(self, out_dir, *, keep_last, writer, collective, report, after_first_save=None):
        self.out_dir, self.keep_last, self.writer, self.collective = Path(out_dir), keep_last, writer, collective
        self.last_step = None  # the step of the newest save (a resumed run's: the step it resumed at)
        self.report, self.after_first_save = report, after_first_save  # after_first_save() -> a line for the log

    @property
    def takes_part(self):
        return self.writer or self.collective

    def save(self, ckpt, *, improved):
        """Write ckpt, the state after ckpt["iter_num"] steps (ckpt.pt too when improved), and say what was written."""
        if not self.writer:
            return
        written = save_run(ckpt, self.out_dir, improved=improved, keep_last=self.keep_last)
        self.last_step = ckpt["iter_num"]
        self.report(f"saving checkpoint to {ckpt['config']['out_dir']} ({', '.join(written)})")
        if self.after_first_save is not None:
            note, self.after_first_save = self.after_first_save(), None
            if note:
                self.report(note)

    def kept(self):
        """What is on disk for a run that stops now without saving."""
        if self.last_step is None:
            return "no checkpoint had been saved yet"
        return f"the last checkpoint ({self.out_dir / LATEST}, step {self.last_step}) is from before and untouched"


def load_checkpoint(path, map_location="cpu", verify=True, optimizer=True):
    """Load a checkpoint with weights_only=True and check what it holds. A missing, damaged, hostile or edited file is
    a one-line UserError naming it; with verify, so is one whose checksum does not match (ours carry one; nanoGPT's
    and older ones do not). optimizer=False is a reader's load (sampling, serving, evaluation, exports, another run's
    weights): the file is memory-mapped and its optimizer state, twice the weights in a trained run, is never read
    (the checksum of the rest verifies it; a file from before that checksum is verified whole)."""
    path = Path(path)
    if not path.exists():
        aside = sorted(path.parent.glob(f".replaced.*.{SET_ASIDE}")) if path.parent.is_dir() else []
        if aside and any(p.suffix == ".pt" for p in aside[-1].iterdir()):
            raise UserError(f"no checkpoint at {path}: a --overwrite=True run that did not finish set the earlier ones "
                            f"aside in {aside[-1]}; train.py puts them back when it next starts there (e.g. with "
                            f"--init_from=resume), or move them back by hand")
        if is_hf_dir(path.parent):
            raise UserError(f"{path.parent} is a Hugging Face model directory, not a run's out_dir: pass "
                            f"--init_from={path.parent}")
        raise UserError(f"no checkpoint at {path}: train one first (init_from=scratch) or check --out_dir")
    try:
        ckpt = _load(path, map_location, mmap=not optimizer)
        mapped = mapped_ranges(path) if not optimizer else []
    except Exception as e:  # an unpickler fed damaged bytes can raise nearly anything (IndexError, OverflowError, ...)
        culprit = _refused_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if culprit:  # weights_only refused something that is not plain data, and named it
            raise UserError(f"checkpoint {path} holds a Python object that weights-only loading refuses ({culprit}): "
                            f"train.py never writes one, and loading it otherwise could run code; load only "
                            f"checkpoints you trust") from None
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({short(first_line(e))}): "
                        f"{_another(path, optimizer)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a nanoGPT-style checkpoint (no 'model'/'model_args'): check the path")
    stored = ckpt.get(CHECKSUM) if isinstance(ckpt.get(CHECKSUM), dict) else {}
    if not optimizer and "weights_sha256" in stored:
        ckpt.pop("optimizer", None)  # mapped, never read: its pages are not touched
    key = "sha256" if "optimizer" in ckpt or "weights_sha256" not in stored else "weights_sha256"
    if verify and stored and stored.get(key) != state_checksum(ckpt, mapped):
        raise UserError(f"checkpoint {path} fails its checksum: its bytes changed after it was written (a disk or copy "
                        f"error): {_another(path, optimizer)}, or pass --verify_checkpoint=False to load it anyway")
    if not optimizer:
        ckpt.pop("optimizer", None)
    check_contents(ckpt, path)
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def _load(path, map_location, mmap):
    """torch.load, weights only; with mmap the tensors are the file's pages, read when touched (not on Windows, where
    a mapped file could not be replaced by the next save, and not for a file in torch's legacy format)."""
    if mmap and not system.mapped_files_block_replace() and map_location == "cpu":
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (pre-zip) format cannot be mapped: read it whole below
                raise
    return torch.load(path, map_location=map_location, weights_only=True)


def _another(path, resuming=False):
    """What to use instead of a damaged checkpoint (resuming: a resume's latest.pt, which train.py takes by name)."""
    path = Path(path)

    def another_file(p):  # not the damaged file under another name (latest.pt and ckpt.pt are often hard links)
        try:
            return p != path and not os.path.samefile(p, path)
        except OSError:  # gone, or a dangling link: nothing to use
            return False
    others = [p.name for p in existing_checkpoints(path.parent) if another_file(p)]
    if resuming and path.name == LATEST and BEST in others:  # a resume takes ckpt.pt when there is no latest.pt
        return (f"move it aside (e.g. mv {path} {path}.damaged) and resume again: it continues from {BEST}, the state "
                f"at the best evaluation")
    return f"use another checkpoint ({', '.join(others)})" if others else "train again, or use a copy of it"


def _refused_global(exc):
    """The global (e.g. posix.system) weights_only's message says it refused, or None."""
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return m.group(1) if m else None


def check_contents(ckpt, path):
    """The keys the toolkit reads, of the types it reads them as: an edited checkpoint is one line, not a KeyError."""
    args = ckpt["model_args"]
    where = f"checkpoint {path}"
    if not isinstance(args, dict) or not all(isinstance(args.get(k), int) and args[k] > 0
                                             for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")):
        raise UserError(f"{where}: model_args must give n_layer, n_head, n_embd, block_size and vocab_size as positive "
                        f"ints: the file was edited or damaged; {_another(path)}")
    if args["n_embd"] % args["n_head"]:
        raise UserError(f"{where}: model_args has n_embd={args['n_embd']} not divisible by n_head={args['n_head']}: "
                        f"the file was edited or damaged; {_another(path)}")
    if not isinstance(ckpt["model"], dict):
        raise UserError(f"{where}: 'model' is not a state dict: {_another(path)}")
    for key in ("config", "meta", "lora"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise UserError(f"{where}: '{key}' is not a dict: the file was edited or damaged; {_another(path)}")
    if ckpt.get("meta") is not None:
        check_meta(ckpt["meta"], f"{where}'s vocabulary", _another(path))


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
