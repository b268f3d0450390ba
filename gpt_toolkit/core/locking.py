"""One writer per directory: a training run owns its out_dir, a preparation its dataset directory, for as long as it
writes there. The lock is the operating system's (flock on a file in the directory), so it dies with its process,
even on SIGKILL: there is never a stale lock to remove by hand. Readers (sample, evaluate, export, plots) take none."""
import contextlib
import os
import re
import sys
import time
from pathlib import Path

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import open_no_follow, process_alive

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
        recorded = f.read().strip()
        holder = lock_holder(f)
        f.close()
        raise UserError(f"{self.what} '{self.path.parent}' is being written by {describe_holder(holder, recorded)}: wait "
                        f"for it to finish {self.fix}") from None

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
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
        if written and process_alive(int(written.group(1))):
            return recorded
        return "another process (which one cannot be told here" + (f"; the lock file names {recorded!r}, which has "
                                                                    f"ended" if written else "") + ")"
    if written and int(written.group(1)) == pid:
        return recorded
    return f"pid {pid} ({command_line(pid) or 'its command line cannot be read'})"


def lock_holder(f):
    """The id of the process holding a flock on the open file f, from /proc/locks (Linux), or None where that cannot
    be told. Lines read 'N: FLOCK  ADVISORY  WRITE PID MAJOR:MINOR:INODE 0 EOF'; a waiter's line has '->'."""
    try:
        st = os.fstat(f.fileno())
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    exact, same_inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}", f":{st.st_ino}"
    found = [(parts[5], int(parts[4])) for parts in map(str.split, lines)
             if len(parts) >= 6 and parts[1] == "FLOCK" and "->" not in parts and parts[4].isdigit()]
    for device in (exact, same_inode):  # an overlay file system reports another device than fstat
        pids = {pid for where, pid in found if where == device or (device == same_inode and where.endswith(device))}
        if len(pids) == 1 and 0 not in pids:
            return pids.pop()
    return None


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", errors="replace").strip()[:200]
    except OSError:
        return None


def _lock(f):
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
