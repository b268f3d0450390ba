"""Files the toolkit writes in place (checkpoints, datasets, configs, tables, plots), written whole or not at all:
into a temp file beside the target, fsynced, then renamed over it. A crash or kill at any moment leaves the old
file or the new one, never a torn one. A temp file's name carries its writer's process id and a marker no user file
has; a later clean-up removes only such files, and only once their writer is dead."""
import errno
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import UserError

TEMP_MARKER = "gpt-toolkit-tmp"
_TEMP_NAME = re.compile(rf"^\..+\.(\d+)\.{TEMP_MARKER}$")


def temp_path(path):
    """Where `path` is written before it is renamed into place: hidden, beside it, named for this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{TEMP_MARKER}")


def open_no_follow(path, flags, mode=0o644):
    """os.open of a file the toolkit owns in a directory (a lock, a log), never through a symbolic link, onto a
    directory or onto anything but a regular file (opening a FIFO waits for ever for its other end): each is a one-line
    UserError naming it, so that nothing outside the directory is written and nothing hangs."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}): the toolkit writes this file itself and "
                        f"does not follow links out of {path.parent}; remove the link")
    if path.is_dir():
        raise UserError(f"{path} is a directory, where the toolkit keeps a file of that name: move it away")
    not_regular = UserError(f"{path} is not a regular file (a FIFO, a socket or a device), where the toolkit keeps a "
                            f"file of that name: move it away")
    if path.exists() and not path.is_file():
        raise not_regular
    no_follow, nonblock = system.no_follow_flags()  # nor a FIFO put there after the look above: no hang either
    try:
        fd = os.open(path, flags | no_follow, mode)
    except OSError as e:
        raise UserError(f"could not open {path} ({e.strerror or e}): check the directory's permissions and free "
                        f"space") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular
    if nonblock:
        os.set_blocking(fd, True)
    return fd


def write_failure_cause(exc, path):
    """Why a write to `path` failed, in the system's words: the OSError behind exc (torch's writer wraps it in a
    RuntimeError that only says "unexpected pos ..."), else "No space left on device" when the disk is full."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    try:
        if shutil.disk_usage(Path(path).parent).free < 1 << 20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def atomic_write(path, write):
    """Call write(f) on a binary file that becomes `path` only once it is complete and on disk. Any error
    (a full disk, an interrupt) leaves `path` as it was and no temp file."""
    def to_file(tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_path(path, to_file, synced=True)


def atomic_write_path(path, write, *, synced=False, replace=True):
    """atomic_write for writers that open the file themselves: write(tmp) writes a file at the temp path `tmp`, which
    becomes `path` only once it is complete and on disk (synced: write has flushed it to disk already). With
    replace=False a file that appeared at `path` meanwhile is never replaced (put_new)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if not synced:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            put_new(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def put_new(tmp, path):
    """Give the complete file `tmp` the name `path` only if nothing has that name: a hard link, which the system
    refuses when path exists (a file, a directory, a link, made by anyone at any moment before), then tmp's name goes.
    Where the file system has no hard links, a rename, after one last look (Windows' rename refuses an existing file
    too). Something at `path` is a one-line UserError; it is left as it is."""
    path = Path(path)
    taken = UserError(f"{path} appeared while this file was being written (another process made it): it was left as "
                      f"it is and this one was not kept; choose another name")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise taken from None
    except OSError:  # no hard links here (FAT, some network shares)
        if path.exists() or path.is_symlink():
            raise taken from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def write_output(path, data, *, ours, what, flag):
    """Write `data` (bytes) at a path the user named for a tool's output (a plot, a table), whole or not at all. A file
    already there is replaced only when ours(its first 4 kB) says it is a `what` this toolkit wrote; anything else
    there (a checkpoint, a dataset, a user's file, a link, a directory) is a one-line UserError naming `flag`, and is
    left as it is, as is a file that appears there while this one is written."""
    path = Path(path)
    existing = check_output(path, ours=ours, what=what, flag=flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_path(path, lambda tmp: Path(tmp).write_bytes(data), replace=existing)
    except OSError as e:
        raise UserError(f"cannot write {path} ({write_failure_cause(e, path)}): choose another {flag}") from None


def check_output(path, *, ours, what, flag):
    """write_output's refusals, for a tool to make before its work (a range test, a report's scoring): returns whether
    a file of ours is there to be replaced."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"the {what}'s output {path} is a directory: give a file name, e.g. {flag} "
                        f"{path / ('out' + path.suffix)}")
    existing = path.exists() or path.is_symlink()
    if existing and (path.is_symlink() or not path.is_file() or not ours(_head(path))):
        raise UserError(f"{path} exists and is not a {what} this toolkit wrote: it is left as it is; choose another "
                        f"{flag} (or move the file away)")
    return existing


def _head(path, size=4096):
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def write_run_file(path, text):
    """atomic_write_text of a file the toolkit keeps in a run's directory (config.json): a directory in its place, a
    full disk or a read-only directory is a one-line UserError naming it."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{path} is a directory, where the toolkit keeps a file of that name: move it away")
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise UserError(f"could not write {path} ({write_failure_cause(e, path)}): free disk space or check the "
                        f"directory's permissions") from None


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def write_directory(path, fill):
    """Call fill(directory) on a new directory that becomes `path` only once it is complete and on disk; `path` must
    not exist or be empty. Its files get the permissions of any new file. Any error leaves `path` as it was and no
    temp directory."""
    path = Path(path)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        mode = _file_mode()
        for p in tmp.iterdir():
            os.chmod(p, mode)  # some writers (safetensors) make their files private: these are for sharing
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) or path.is_symlink() or (
                    path.exists() and not path.is_dir()):
                raise UserError(f"{path} was written by another process while this one wrote it (another export to "
                                f"the same place?): this one was not kept; check {path}, or write to another place"
                                ) from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def check_new_directory(path, flag="--to"):
    """Refuse, in one line and before any work, a directory to create (write_directory) where something is already:
    anything but nothing or an empty directory; a symbolic link too (nothing is written through one)."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{flag}={path} is a symbolic link (to {os.readlink(path)}): give the path of a new directory "
                        f"(nothing is written through links)")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{flag}={path} already exists and is not an empty directory: choose a new {flag} (nothing is "
                        f"overwritten)")


def _file_mode():
    """The permissions a new file gets here (0o666 less the umask), which os.umask only tells by setting it."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def replace_together(paths, write, *, remove=()):
    """Call write({path: binary file}) on temp files beside paths, then fsync them and rename them all into place,
    the last of paths last (the file that describes the set, so a reader that checks it against the others sees
    either set whole); the files in `remove` (stale ones of the old set) go just before it. Files written piece by
    piece (a dataset bigger than memory) replace the old ones together or not at all: any error before the renames
    (a full disk, a bad input found half-way, an interrupt) leaves the old files and no temp file."""
    temps = {Path(p): temp_path(p) for p in paths}
    opened = {}
    try:
        for path, tmp in temps.items():
            opened[path] = open(tmp, "wb")
        write(opened)
        for f in opened.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
    except BaseException:
        for f in opened.values():
            f.close()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    *first, (last, last_tmp) = temps.items()
    for path, tmp in first:
        os.replace(tmp, path)
    for path in remove:
        Path(path).unlink(missing_ok=True)
    os.replace(last_tmp, last)
    for directory in {path.parent for path in temps}:
        fsync_dir(directory)


def remove_stale_temps(directory):
    """Delete the temp files (and directories) that writes killed part-way left in `directory`: only names made by
    temp_path, and only when the process that made them is gone. Returns the names removed."""
    removed = []
    for p in Path(directory).glob(f".*.{TEMP_MARKER}"):
        m = _TEMP_NAME.match(p.name)
        if m is None or system.process_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def fingerprint(path, *, chunks=16, chunk_bytes=1 << 20):
    """A cheap identity of a file's content: sha256 of its size and of `chunks` evenly spaced pieces of chunk_bytes
    (all of it when it is smaller than that). Two preparations of a dataset never share one in practice, and a
    truncated or swapped file changes it."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= chunks * chunk_bytes:
            h.update(f.read())
        else:
            for i in range(chunks):
                f.seek((size - chunk_bytes) * i // (chunks - 1))
                h.update(f.read(chunk_bytes))
    return h.hexdigest()


def fsync_dir(directory):
    """Make a rename in `directory` itself durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def keep_numbered(path):
    """Rename an existing non-empty file to path.1, path.2, ... so that a new run never writes over an old log. (A link or
    a directory there is left as it is: opening the log refuses it.)"""
    if not path.is_file() or path.is_symlink() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    old = path.with_name(f"{path.name}.{n}")
    os.replace(path, old)
    return old
