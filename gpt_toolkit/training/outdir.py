"""A run's out_dir: whether it may be written (check_out_dir, before any work), and the run's ownership of it while it
writes there (OutDir): one writer at a time, the clean-up of what killed runs left, and --overwrite=True's old
checkpoints, set aside until the new run's first save replaces them, put back if it ends before that."""
import json
import os
import re
import shutil
from pathlib import Path

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import atomic_write_text, fsync_dir, remove_stale_temps
from gpt_toolkit.core.locking import DirectoryLock
from gpt_toolkit.models.checkpoint import SET_ASIDE, existing_checkpoints

JOURNAL = "set-aside.json"  # in a set-aside folder, written before anything moves there: {name: inode} of each file
RUN_FILES = ("training.log", "metrics.jsonl", "config.json")  # they describe the checkpoints' run: set aside with them
_SET_ASIDE_NAME = re.compile(rf"^\.replaced\.(\d+)\.{SET_ASIDE}(\.done)?$")


def _lock(out_dir):
    return DirectoryLock(out_dir, what="out_dir", fix="or choose another --out_dir")


def check_out_dir(cfg, source):
    """Refuse, before any work: an out_dir another run is writing (naming it), replacing an earlier run's checkpoints
    without --overwrite=True, and an out_dir that cannot be written. Returns lines for the run's log: checkpoints a
    killed --overwrite=True run had set aside are put back first (so a resume finds them). source: the run's
    source.ModelSource."""
    out_dir = Path(cfg.out_dir)
    notes = []
    if out_dir.is_file() and out_dir.suffix == ".pt":
        raise UserError(f"--out_dir={out_dir} is a checkpoint file: pass its directory, --out_dir={out_dir.parent}")
    if out_dir.is_dir():
        _lock(out_dir).check_free()  # the run takes the lock itself once every check has passed
        notes = settle_killed_overwrites(out_dir)
    found = existing_checkpoints(out_dir) if out_dir.is_dir() else []
    if found and cfg.eval_only and source.scratch:
        raise UserError(f"out_dir '{out_dir}' holds a trained checkpoint ({found[-1].name}), and --eval_only=True with "
                        f"init_from=scratch would evaluate a new, untrained model: evaluate the trained one with "
                        f"--init_from=resume")
    if found and not source.resumes and not cfg.eval_only and not cfg.overwrite:
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
    run set aside, and with --overwrite=True set the current checkpoints aside, with the logs and config.json that
    describe their run (set_aside: a journal first, then the moves). first_save_done() drops them once the new run has
    saved; leaving before that puts them back. notes are lines for the run's log."""

    def __init__(self, cfg, source, *, writer=True):
        self.path, self.writer = Path(cfg.out_dir), writer
        self.overwrite = cfg.overwrite and not source.resumes and not cfg.eval_only
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
                self.set_aside = set_aside(self.path, found + [self.path / n for n in RUN_FILES
                                                               if (self.path / n).is_file()])
                self.notes.append(f"--overwrite=True: the earlier checkpoints ({', '.join(p.name for p in found)}) are "
                                  f"set aside until this run's first save replaces them")
        return self

    def first_save_done(self):
        """The new run has saved: what was set aside goes. Returns a line for the log, or None."""
        if self.set_aside is None:
            return None
        kept = _keep_old_logs(self.set_aside, self.path)
        done = self.set_aside.with_name(self.set_aside.name + ".done")
        os.replace(self.set_aside, done)  # one rename: a start after a kill from here on knows the new run saved
        shutil.rmtree(done, ignore_errors=True)
        self.set_aside = None
        return ("--overwrite=True: the earlier run's checkpoints are now replaced"
                + (f" (its {', '.join(kept)} kept)" if kept else ""))

    def __exit__(self, *exc):
        if self.set_aside is not None:  # the run ended before its first save: the old checkpoints come back
            names, kept = _restore(self.set_aside, self.path)
            print(f"--overwrite=True: this run saved nothing, so the earlier checkpoints are back "
                  f"({', '.join(n for n in names if n.endswith('.pt'))}){_with_logs(names, kept)}", flush=True)
        if self.lock is not None:
            self.lock.release()


def set_aside(out_dir, files):
    """Move files into a new set-aside folder in out_dir, as one step a later start completes or undoes: the
    journal (each file's name and inode) is on disk before the first move. Returns the folder."""
    folder = Path(out_dir) / f".replaced.{os.getpid()}.{SET_ASIDE}"
    folder.mkdir()
    atomic_write_text(folder / JOURNAL, json.dumps({p.name: os.stat(p).st_ino for p in files}))
    for p in files:
        os.replace(p, folder / p.name)
    fsync_dir(out_dir)
    fsync_dir(folder)
    return folder


def settle_killed_overwrites(out_dir):
    """What a --overwrite=True run killed before it finished setting files aside, or before its first save, left in a
    set-aside folder: put back (its journal says what moved; a file it has not moved yet stays), or, when the run's
    first save is on disk (the folder renamed .done, or a checkpoint the journal does not know), dropped. A folder the
    journal does not account for is left as it is, and said. Returns lines for the log."""
    notes = []
    for d in sorted(Path(out_dir).glob(f".replaced.*.{SET_ASIDE}*")):
        m = _SET_ASIDE_NAME.match(d.name)
        if m is None or system.process_alive(int(m.group(1))) or not d.is_dir():
            continue
        journal = _journal(d)
        if m.group(2):  # the new run had saved and was removing it
            _keep_old_logs(d, Path(out_dir))
            shutil.rmtree(d, ignore_errors=True)
        elif journal is None or any(p.name not in journal for p in d.iterdir() if p.name != JOURNAL):
            if journal is None and not any(p.name != JOURNAL and not p.name.startswith(".") for p in d.iterdir()):
                shutil.rmtree(d, ignore_errors=True)  # killed before its journal was written: nothing moved
            else:
                notes.append(f"left {d} as it is: it holds files a killed --overwrite=True run set aside, and its "
                             f"journal does not account for them all; move back what you need")
        elif any(os.stat(p).st_ino not in journal.values() for p in existing_checkpoints(out_dir)):
            _keep_old_logs(d, Path(out_dir))  # the new run saved before it was killed: the overwrite completes
            shutil.rmtree(d, ignore_errors=True)
        else:
            names, kept = _restore(d, Path(out_dir))
            notes.append(f"put back the checkpoints ({', '.join(n for n in names if n.endswith('.pt'))}) that a run "
                         f"killed before its first save had set aside with --overwrite=True{_with_logs(names, kept)}")
    return notes


def _journal(folder):
    try:
        journal = json.loads((folder / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, dict) else None


def _restore(folder, out_dir):
    """Move what folder holds back to out_dir. A file of the same name there now (the newer run's log or config.json)
    is kept as NAME.1 (NAME.2, ...). Returns (the names put back, the names the newer files were kept under)."""
    names, kept = [], []
    for p in sorted(folder.iterdir()):
        if p.name == JOURNAL:
            continue
        target = out_dir / p.name
        if target.exists():
            newer = _free_name(target)
            os.replace(target, newer)
            kept.append(newer.name)
        os.replace(p, target)
        names.append(p.name)
    shutil.rmtree(folder, ignore_errors=True)
    fsync_dir(out_dir)
    return names, kept


def _free_name(target):
    n = 1
    while target.with_name(f"{target.name}.{n}").exists():
        n += 1
    return target.with_name(f"{target.name}.{n}")


def _keep_old_logs(folder, out_dir):
    """The replaced run's logs and config.json are a record, not state: they stay in out_dir as NAME.1 (NAME.2, ...)
    when its checkpoints go. Returns the names they were kept under."""
    kept = []
    for name in RUN_FILES:
        if (folder / name).is_file():
            target = _free_name(out_dir / name)
            os.replace(folder / name, target)
            kept.append(target.name)
    if kept:
        fsync_dir(out_dir)
    return kept


def _with_logs(names, kept):
    logs = [n for n in names if not n.endswith(".pt")]
    if not logs:
        return ""
    return f", with their run's {', '.join(logs)}" + (f" (this run's are kept as {', '.join(kept)})" if kept else "")
