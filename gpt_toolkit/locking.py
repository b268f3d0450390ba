"""One writer per directory: a training run owns its out_dir, a preparation its dataset directory, for as long as it
writes there. The lock is the operating system's (flock on a file in the directory), so it dies with its process,
even on SIGKILL: there is never a stale lock to remove by hand. Readers (sample, evaluate, export, plots) take none."""
import contextlib
import os
import sys
import time
from pathlib import Path

from gpt_toolkit.errors import UserError
from gpt_toolkit.files import open_no_follow

LOCK_NAME = ".gpt-toolkit.lock"  # the lock file; it stays when its owner ends, unlocked

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


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
            _lock(f)
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
                _lock(f)
            except OSError:
                self._refuse(f)

    def _refuse(self, f):
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{self.what} '{self.path.parent}' is being written by {owner}: wait for it to finish "
                        f"{self.fix}") from None

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _lock(f):
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
