"""Files the toolkit writes in place (checkpoints, datasets, configs, tables, plots), written whole or not at all:
into a temp file beside the target, fsynced, then renamed over it. A crash or kill at any moment leaves the old
file or the new one, never a torn one; the temp file a killed write leaves behind is removed by the next run."""
import os
import shutil
from pathlib import Path


def temp_path(path):
    """Where `path` is written before it is renamed into place: hidden, beside it, named for this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path, write):
    """Call write(f) on a binary file that becomes `path` only once it is complete and on disk. Any error
    (a full disk, an interrupt) leaves `path` as it was and no temp file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def write_directory(path, fill):
    """Call fill(directory) on a new directory that becomes `path` only once it is complete and on disk; `path` must
    not exist or be empty. Any error leaves `path` as it was and no temp directory."""
    path = Path(path)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def replace_together(paths, write):
    """Call write({path: binary file}) on temp files beside paths, then fsync them and rename them all into place:
    files written piece by piece (a dataset bigger than memory) replace the old ones together or not at all. Any
    error (a full disk, a bad input found half-way, an interrupt) leaves the old files and no temp file."""
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
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for f in opened.values():
            f.close()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for directory in {path.parent for path in temps}:
        fsync_dir(directory)


def remove_stale_temps(directory):
    """Delete temp files (and directories) left in `directory` by a write that was killed part-way (never read:
    the rename never happened)."""
    for p in Path(directory).glob(".*.tmp*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


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
