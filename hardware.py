"""Which device, dtype and compile setting a run uses, and the peak FLOP/s that MFU is measured against.

Every choice here has a CPU/MPS-safe path: autocast and GradScaler get the real device type,
and GradScaler is only enabled for float16.
"""
import contextlib
import functools
import os
import time

import torch

from errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (no sparsity) tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
# float32 rows are TF32 peaks, because training enables TF32 matmuls on CUDA. The longest matching name wins
# ("H100 PCIe" over "H100", "A10G" over "A10"), whatever the order of the list.
GPU_PEAK_FLOPS = [
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    ("A10G", {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12}),
    ("A10", {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    ("RTX 4090", {"bfloat16": 165e12, "float16": 165e12, "float32": 82.6e12}),
    ("RTX 3090", {"bfloat16": 71e12, "float16": 71e12, "float32": 35.6e12}),
    ("V100", {"float16": 125e12, "float32": 15.7e12}),
    ("T4", {"float16": 65e12, "float32": 8.1e12}),
]


def resolve_device(name):
    """'auto' -> cuda, else mps, else cpu. An explicit device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but this machine has no usable CUDA GPU "
                            f"(torch {torch.__version__}, cuda build: {torch.version.cuda}): use --device=cpu or --device=auto")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(f"device={name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use --device=cuda:0")
        return name
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise UserError("device=mps but MPS is not available here (needs Apple silicon and a torch build with MPS): "
                            "use --device=cpu")
        return name
    if kind == "cpu" and not index:
        return name
    raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")


def device_type(device):
    return device.partition(":")[0]


def cpu_has_native_bf16():
    """True when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name, device):
    """'auto' -> bfloat16 on CUDA GPUs that support it, else float16 (with GradScaler); on CPU bfloat16 where
    the CPU multiplies bf16 in hardware (AVX512-BF16/AMX), else float32; float32 on MPS."""
    kind = device_type(device)
    if name == "auto":
        if kind == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if kind == "cpu" and cpu_has_native_bf16():
            return "bfloat16"
        return "float32"
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': use auto, float32, bfloat16 or float16")
    if name == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype=bfloat16 is not supported by {torch.cuda.get_device_name()}: use --dtype=float16 or --dtype=auto")
    return name


def resolve_compile(flag, device):
    """'auto' compiles on CUDA only: on CPU and MPS compile time is rarely won back."""
    if flag == "auto":
        return device_type(device) == "cuda"
    return bool(flag)


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device_type(device), dtype=DTYPES[dtype])


def grad_scaler(device, dtype):
    """Loss scaling is only needed (and only enabled) for float16."""
    return torch.amp.GradScaler(device_type(device), enabled=(dtype == "float16"))


def synchronize(device):
    """Wait for the device's queued work, so a timer reads its end (CUDA and MPS run asynchronously; CPU never does)."""
    if device_type(device) == "cuda":
        torch.cuda.synchronize(device)
    elif device_type(device) == "mps":
        torch.mps.synchronize()


def measure_matmul_flops(device, dtype, seconds=0.2):
    """Best observed FLOP/s of square matmuls: the practical peak where no spec is known. The best of several
    sizes, since no single size is the fastest everywhere; smallest first, and no larger size once one matmul takes
    more than its share of the time (float16 on a CPU without it in hardware: a 1024 x 1024 matmul took seconds)."""
    sizes = (256, 512, 1024) if device_type(device) == "cpu" else (2048, 4096)
    best = 0.0
    for n in sizes:
        flops = square_matmul_flops(device, dtype, n, seconds / len(sizes))
        best = max(best, flops)
        if 2 * n**3 / flops > seconds / len(sizes) / 8:  # one matmul of the next size does 8x the work
            break
    return best


def square_matmul_flops(device, dtype, n, seconds):
    """Best FLOP/s of an n x n matmul seen in `seconds` of repeats (at least one). The operands come
    from a private generator: a draw from the global RNG here would change the dropout masks of the run that
    measures (and break its exact resume)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype], generator=gen)
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype], generator=gen)
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    a @ b
    synchronize(device)
    best = 2 * n**3 / (time.perf_counter() - t0)
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def memory_in_use(device):
    """Bytes in use now: CUDA's allocator on GPU, the process's resident set on CPU."""
    if device_type(device) == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device):
    """Start a new peak-memory measurement (on CPU: reset Linux's resident-set high-water mark)."""
    if device_type(device) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        raise UserError("measuring peak memory on CPU needs Linux's /proc/self/clear_refs") from None


def peak_memory(device):
    """Peak bytes since reset_peak_memory."""
    if device_type(device) == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise UserError("no VmHWM in /proc/self/status: cannot read the peak memory on this system")


def gpu_spec_peaks(name):
    """{dtype: FLOP/s} of the longest GPU_PEAK_FLOPS key in the device name; {} for an unknown GPU."""
    matches = [(key, peaks) for key, peaks in GPU_PEAK_FLOPS if key in name]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else {}


@functools.cache  # measured once per process
def peak_flops(device, dtype):
    """(FLOP/s, where the figure comes from) for MFU: a spec table for known GPUs, else a measured matmul."""
    if device_type(device) == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = gpu_spec_peaks(name)
        if dtype in peaks:
            return peaks[dtype], f"{name} {dtype} spec"
    return measure_matmul_flops(device, dtype), f"measured {dtype} matmul on {device}"
