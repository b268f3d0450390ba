"""A run's out_dir: whether it may be written (check_out_dir, before any work), and the run's ownership of it while it
writes there (OutDir): one writer at a time, the clean-up of what killed runs left, and --overwrite=True's old
checkpoints, set aside until the new run's first save replaces them, put back if it ends before that."""
import os
import re
import shutil
from pathlib import Path

from gpt_toolkit.checkpoint import existing_checkpoints
from gpt_toolkit.errors import UserError
from gpt_toolkit.files import fsync_dir, process_alive, remove_stale_temps
from gpt_toolkit.locking import DirectoryLock

SET_ASIDE = "gpt-toolkit-set-aside"  # .replaced.<pid>.gpt-toolkit-set-aside/: checkpoints --overwrite=True replaces
_SET_ASIDE_NAME = re.compile(rf"^\.replaced\.(\d+)\.{SET_ASIDE}$")


def _lock(out_dir):
    return DirectoryLock(out_dir, what="out_dir", fix="or choose another --out_dir")


def check_out_dir(cfg):
    """Refuse, before any work: an out_dir another run is writing (naming it), replacing an earlier run's checkpoints
    without --overwrite=True, and an out_dir that cannot be written. Returns lines for the run's log: checkpoints a
    killed --overwrite=True run had set aside are put back first (so a resume finds them)."""
    out_dir = Path(cfg.out_dir)
    notes = []
    if out_dir.is_file() and out_dir.suffix == ".pt":
        raise UserError(f"--out_dir={out_dir} is a checkpoint file: pass its directory, --out_dir={out_dir.parent}")
    if out_dir.is_dir():
        _lock(out_dir).check_free()  # the run takes the lock itself once every check has passed
        notes = settle_killed_overwrites(out_dir)
    found = existing_checkpoints(out_dir) if out_dir.is_dir() else []
    if found and cfg.init_from != "resume" and not cfg.eval_only and not cfg.overwrite:
        raise UserError(f"out_dir '{out_dir}' already holds a checkpoint ({found[-1].name}): continue it with "
                        f"--init_from=resume, choose another --out_dir, or pass --overwrite=True to replace it")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        reason = "a file is in the way" if not existing.is_dir() else "permission denied"
        raise UserError(f"cannot write to out_dir '{out_dir}' ({reason} at {existing}): choose another --out_dir")
    return notes


class OutDir:
    """The run's hold on out_dir (with writer=False, on DDP ranks other than 0, it does nothing). On entering: make
    the directory, take its lock, remove the temp files of writers that died, settle what a killed --overwrite=True
    run set aside, and with --overwrite=True set the current checkpoints aside. first_save_done() drops them once the
    new run has saved; leaving before that puts them back. notes are lines for the run's log."""

    def __init__(self, cfg, *, writer=True):
        self.path, self.writer = Path(cfg.out_dir), writer
        self.overwrite = cfg.overwrite and cfg.init_from != "resume" and not cfg.eval_only
        self.lock, self.set_aside, self.notes = None, None, []

    def __enter__(self):
        if not self.writer:
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to out_dir '{self.path}' ({e.strerror}): choose another --out_dir") from None
        self.lock = _lock(self.path).acquire()
        self.notes += settle_killed_overwrites(self.path)
        remove_stale_temps(self.path)
        if self.overwrite:
            found = existing_checkpoints(self.path)
            if found:
                self.set_aside = self.path / f".replaced.{os.getpid()}.{SET_ASIDE}"
                self.set_aside.mkdir()
                for p in found:
                    os.replace(p, self.set_aside / p.name)
                fsync_dir(self.path)
                self.notes.append(f"--overwrite=True: the earlier checkpoints ({', '.join(p.name for p in found)}) are "
                                  f"set aside until this run's first save replaces them")
        return self

    def first_save_done(self):
        """The new run has saved: what was set aside goes. Returns a line for the log, or None."""
        if self.set_aside is None:
            return None
        shutil.rmtree(self.set_aside, ignore_errors=True)
        self.set_aside = None
        return "--overwrite=True: the earlier run's checkpoints are now replaced"

    def __exit__(self, *exc):
        if self.set_aside is not None:  # the run ended before its first save: the old checkpoints come back
            names = _restore(self.set_aside, self.path)
            print(f"--overwrite=True: this run saved nothing, so the earlier checkpoints are back ({', '.join(names)})",
                  flush=True)
        if self.lock is not None:
            self.lock.release()



def settle_killed_overwrites(out_dir):
    """A run killed between setting checkpoints aside and its first save left them aside: put them back when out_dir
    has none of its own, else (it did save) drop them. Returns lines for the log."""
    notes = []
    for d in Path(out_dir).glob(f".replaced.*.{SET_ASIDE}"):
        m = _SET_ASIDE_NAME.match(d.name)
        if m is None or process_alive(int(m.group(1))) or not d.is_dir():
            continue
        if existing_checkpoints(out_dir):
            shutil.rmtree(d, ignore_errors=True)
        else:
            names = _restore(d, Path(out_dir))
            notes.append(f"put back the checkpoints ({', '.join(names)}) that a run killed before its first save "
                         f"had set aside with --overwrite=True")
    return notes


def _restore(set_aside, out_dir):
    names = []
    for p in sorted(set_aside.iterdir()):
        if not (out_dir / p.name).exists():
            os.replace(p, out_dir / p.name)
            names.append(p.name)
    shutil.rmtree(set_aside, ignore_errors=True)
    fsync_dir(out_dir)
    return names
