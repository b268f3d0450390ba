"""One writer per directory: a training run owns its out_dir, a preparation its dataset directory, for as long as it
writes there. The lock is the operating system's (flock on a file in the directory), so it dies with its process,
even on SIGKILL: there is never a stale lock to remove by hand. Readers (sample, evaluate, export, plots) take none."""
import contextlib
import os
import re
import sys
import time
from pathlib import Path

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import open_no_follow

LOCK_NAME = ".gpt-toolkit.lock"  # the lock file; it stays when its owner ends, unlocked


class DirectoryLock:
    """An exclusive, non-blocking lock on `directory` (which must exist). acquire() raises a one-line UserError naming
    the process that holds it; `what` and `fix` word that error ("out_dir", "or use another --out_dir")."""

    def __init__(self, directory, *, what, fix):
        self.path = Path(directory) / LOCK_NAME
        self.what, self.fix = what, fix
        self.file = None

    def acquire(self):
        f = os.fdopen(open_no_follow(self.path, os.O_RDWR | os.O_CREAT), "r+", encoding="utf-8")  # held while locked
        try:
            system.lock(f)
        except OSError:
            self._refuse(f)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} ({' '.join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]}, "
                    f"since {time.strftime('%H:%M:%S')})\n")
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # closing flushes again, and fails again
                f.close()
            raise UserError(f"could not write the lock file {self.path} ({e.strerror or e}): free disk space") from None
        self.file = f
        return self

    def check_free(self):
        """Refuse as acquire() would when another process holds the lock; writes nothing (not even the lock file)."""
        if not self.path.exists() and not self.path.is_symlink():
            return  # no lock file: nobody has ever held it
        f = os.fdopen(open_no_follow(self.path, os.O_RDONLY), encoding="utf-8")
        with f:
            try:
                system.lock(f)
            except OSError:
                self._refuse(f)
            system.unlock(f)

    def _refuse(self, f):
        try:
            f.seek(0)
            recorded = f.read().strip()
        except (OSError, UnicodeDecodeError):  # a lock file that is not ours to read: its holder is still told
            recorded = ""
        holder = system.lock_holder(f)
        f.close()
        raise UserError(f"{self.what} '{self.path.parent}' is being written by {describe_holder(holder, recorded)}: wait "
                        f"for it to finish {self.fix}") from None

    def release(self):
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.flush()
                system.unlock(self.file)
            self.file.close()
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def describe_holder(pid, recorded):
    """Who holds a lock, in words: the process the system names (pid, or None where it cannot tell) with what its
    lock file says when that was written by it, else its command line; the file's words alone when the system cannot
    tell and the process they name still runs. The file may name an earlier holder (a process that has ended while one
    it started, which shares the lock, goes on; a lock taken by a program that writes nothing)."""
    written = re.match(r"pid (\d+) ", recorded + " ")
    if pid is None:
        if written and system.process_alive(int(written.group(1))):
            return recorded
        return "another process (which one cannot be told here" + (f"; the lock file names {recorded!r}, which has "
                                                                    f"ended" if written else "") + ")"
    if written and int(written.group(1)) == pid:
        return recorded
    return f"pid {pid} ({system.command_line(pid) or 'its command line cannot be read'})"
