"""The process-wide settings a script makes once, at its start, by calling setup_process. Nothing else in the
toolkit changes process-wide state, and importing a module changes none."""
import atexit
import gc

import torch

from gpt_toolkit.core import system

_fast_exit_registered = False


def setup_process(device=None, *, keep_cpu_memory=True, compile=False):
    """Apply the settings a script's run wants, for the whole process (none of them can be undone):
      - a fast exit: at exit the interpreter's last garbage collections would walk every object torch made (~300K
        once torch._dynamo is imported, about a second); gc.freeze at exit makes them skip those objects;
      - on CUDA, TF32 matmuls for float32 (the GPU peak table's float32 figures assume them);
      - on CPU with keep_cpu_memory, glibc's malloc keeps what a training step frees for the next (keep_freed_memory);
      - on CPU with compile (the run compiles), torch's deterministic algorithms: inductor's CPU kernels otherwise
        add up scattered gradients (the embedding's) with atomic adds, in a different order every run, so two runs
        of one seed drift apart from the first steps (no slowdown seen: docs/performance.md). The toolkit's eager
        CPU steps give the same losses either way (checked); torch.empty stays unfilled. A tool that runs train.py's
        main several times in one process keeps the setting for its later runs too.
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
    if kind == "cpu" and keep_cpu_memory and system.keep_freed_memory():
        applied.append("CPU allocator keeps freed memory")
    if kind == "cpu" and compile:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # deterministic mode's NaN fill: time, no gain
        applied.append("deterministic algorithms")
    return applied


def release_pages(tensor, ranges):
    """Give back the resident pages of a CPU tensor that lies in one of `ranges`, a file's memory mappings
    (system.mapped_ranges of a checkpoint checkpoint.load_checkpoint mapped): they are clean copies of the file, read again
    from it if touched (the page cache has them), so a reader that has hashed or converted a weight need not keep it
    in its resident set. Anything else (anonymous memory, which this would zero) is left alone. Linux only; whole
    pages inside the tensor; never for a mapped tensor that was written to (its changes would be lost)."""
    if tensor.device.type != "cpu" or not tensor.numel():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in ranges):
        return
    page = system.PAGE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        system.drop_pages(first, last - first)
