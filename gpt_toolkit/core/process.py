"""The process-wide settings a script makes once, at its start, by calling setup_process. Nothing else in the
toolkit changes process-wide state, and importing a module changes none."""
import atexit
import ctypes
import gc
import os
import sys

import torch

_fast_exit_registered = False


def setup_process(device=None, *, keep_cpu_memory=True):
    """Apply the settings a script's run wants, for the whole process (none of them can be undone):
      - a fast exit: at exit the interpreter's last garbage collections would walk every object torch made (~300K
        once torch._dynamo is imported, about a second); gc.freeze at exit makes them skip those objects;
      - on CUDA, TF32 matmuls for float32 (the GPU peak table's float32 figures assume them);
      - on CPU with keep_cpu_memory, glibc's malloc keeps what a training step frees for the next (keep_freed_memory).
    device is a resolved device name ('cpu', 'cuda:0', ...) or None for a script that trains nothing.
    Returns the names of the settings applied."""
    global _fast_exit_registered
    applied = ["fast exit"]
    if not _fast_exit_registered:
        atexit.register(gc.freeze)  # handlers registered later (loggers' flushes) run before this one
        _fast_exit_registered = True
    kind = str(device).partition(":")[0] if device else None
    if kind == "cuda":
        torch.set_float32_matmul_precision("high")
        applied.append("TF32 matmuls")
    if kind == "cpu" and keep_cpu_memory and keep_freed_memory():
        applied.append("CPU allocator keeps freed memory")
    return applied


MADV_DONTNEED = 4  # Linux's <sys/mman.h>
PAGE = 4096


def mapped_ranges(path):
    """[(start, end)] of this process's memory mappings of the file at `path` (Linux's /proc/self/maps; [] where
    there is none, or elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    target, ranges = os.path.realpath(path), []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and os.path.realpath(parts[5]) == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_pages(tensor, ranges):
    """Give back the resident pages of a CPU tensor that lies in one of `ranges`, a file's memory mappings
    (mapped_ranges of a checkpoint checkpoint.load_checkpoint mapped): they are clean copies of the file, read again
    from it if touched (the page cache has them), so a reader that has hashed or converted a weight need not keep it
    in its resident set. Anything else (anonymous memory, which this would zero) is left alone. Linux only; whole
    pages inside the tensor; never for a mapped tensor that was written to (its changes would be lost)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.numel():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in ranges):
        return
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if last > first:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
        except (OSError, AttributeError):
            pass


def keep_freed_memory():
    """Make glibc's malloc keep the memory a training step frees for the next one: blocks up to 1 GB come from its
    heap instead of fresh mmaps, and the heap is not given back to the system until 2 GB of it are free. With
    glibc's defaults every CPU step page-faults much of its activation memory back in (docs/performance.md); the
    peak stays within a few percent. Linux with glibc only: returns whether the setting took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # the trim threshold only if the mmap one took: alone it made steps slower (each big block freshly mapped)
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
