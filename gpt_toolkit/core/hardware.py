"""Which device, dtype and compile setting a run uses, and the peak FLOP/s that MFU is measured against.

Every choice here has a CPU/MPS-safe path: autocast and GradScaler get the real device type,
and GradScaler is only enabled for float16.
"""
import contextlib
import functools
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import atomic_write_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ["auto", *DTYPES]  # what every --dtype accepts

# Dense (no sparsity) tensor-core peaks in FLOP/s, by the name torch.cuda.get_device_name() reports. Matched as whole
# words, the longest matching name wins ("H100 PCIe" over "H100", "RTX 3060 Ti" over "RTX 3060", "L40S" over "L40"),
# whatever the order of the list. bfloat16/float16 are the peaks with float32 accumulation (what PyTorch's matmuls
# use); float32 rows are TF32 peaks, since training enables TF32 matmuls on CUDA (plain FP32 where there is no TF32).
# Sources: NVIDIA's datasheets and architecture whitepapers (Turing TU102, Ampere GA100/GA102, Ada AD102, Hopper
# H100/GH200, Blackwell DGX B200). GeForce cards run float16/bfloat16 with float32 accumulation at half the rate of
# the workstation and datacenter cards; cards a whitepaper does not list are worked out the way the whitepapers do,
# tensor cores x boost clock x dense FLOPs per tensor core per clock: Turing GeForce 64 (fp16), Ampere and Ada
# GeForce 128 (bf16/fp16) and 64 (tf32), workstation Ampere and Ada 256 and 128. Laptop variants clock lower.
GPU_PEAK_FLOPS = [
    # datacenter
    ("B200", {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12}),
    ("GH200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    ("L40", {"bfloat16": 181e12, "float16": 181e12, "float32": 90.5e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    ("A10G", {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12}),
    ("A10", {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    ("V100", {"float16": 125e12, "float32": 15.7e12}),
    ("T4", {"float16": 65e12, "float32": 8.1e12}),
    # workstation: Ampere RTX A-series, Ada
    ("RTX 6000 Ada", {"bfloat16": 364e12, "float16": 364e12, "float32": 182e12}),
    ("A6000", {"bfloat16": 154.8e12, "float16": 154.8e12, "float32": 77.4e12}),
    ("A5500", {"bfloat16": 136.4e12, "float16": 136.4e12, "float32": 68.2e12}),
    ("A5000", {"bfloat16": 111.1e12, "float16": 111.1e12, "float32": 55.6e12}),
    ("A4500", {"bfloat16": 94.6e12, "float16": 94.6e12, "float32": 47.3e12}),
    ("A4000", {"bfloat16": 76.7e12, "float16": 76.7e12, "float32": 38.4e12}),
    # GeForce RTX 40 (Ada)
    ("RTX 4090", {"bfloat16": 165.2e12, "float16": 165.2e12, "float32": 82.6e12}),
    ("RTX 4080 SUPER", {"bfloat16": 104.4e12, "float16": 104.4e12, "float32": 52.2e12}),
    ("RTX 4080", {"bfloat16": 97.5e12, "float16": 97.5e12, "float32": 48.7e12}),
    ("RTX 4070 Ti SUPER", {"bfloat16": 88.2e12, "float16": 88.2e12, "float32": 44.1e12}),
    ("RTX 4070 Ti", {"bfloat16": 80.2e12, "float16": 80.2e12, "float32": 40.1e12}),
    ("RTX 4070 SUPER", {"bfloat16": 71.0e12, "float16": 71.0e12, "float32": 35.5e12}),
    ("RTX 4070", {"bfloat16": 58.3e12, "float16": 58.3e12, "float32": 29.1e12}),
    ("RTX 4060 Ti", {"bfloat16": 44.1e12, "float16": 44.1e12, "float32": 22.1e12}),
    ("RTX 4060", {"bfloat16": 30.2e12, "float16": 30.2e12, "float32": 15.1e12}),
    # GeForce RTX 30 (Ampere)
    ("RTX 3090 Ti", {"bfloat16": 80.0e12, "float16": 80.0e12, "float32": 40.0e12}),
    ("RTX 3090", {"bfloat16": 71e12, "float16": 71e12, "float32": 35.6e12}),
    ("RTX 3080 Ti", {"bfloat16": 68.2e12, "float16": 68.2e12, "float32": 34.1e12}),
    ("RTX 3080", {"bfloat16": 59.5e12, "float16": 59.5e12, "float32": 29.8e12}),
    ("RTX 3070 Ti", {"bfloat16": 43.5e12, "float16": 43.5e12, "float32": 21.7e12}),
    ("RTX 3070", {"bfloat16": 40.6e12, "float16": 40.6e12, "float32": 20.3e12}),
    ("RTX 3060 Ti", {"bfloat16": 32.4e12, "float16": 32.4e12, "float32": 16.2e12}),
    ("RTX 3060", {"bfloat16": 25.5e12, "float16": 25.5e12, "float32": 12.7e12}),  # the tutorial's card
    # GeForce RTX 20 (Turing: float16 tensor cores, no bfloat16, no TF32)
    ("RTX 2080 Ti", {"float16": 53.8e12, "float32": 13.4e12}),
    ("RTX 2080 SUPER", {"float16": 44.6e12, "float32": 11.2e12}),
    ("RTX 2080", {"float16": 40.3e12, "float32": 10.1e12}),
    ("RTX 2070 SUPER", {"float16": 36.2e12, "float32": 9.1e12}),
    ("RTX 2070", {"float16": 29.9e12, "float32": 7.5e12}),
    ("RTX 2060 SUPER", {"float16": 28.7e12, "float32": 7.2e12}),
    ("RTX 2060", {"float16": 25.8e12, "float32": 6.5e12}),
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


CPU_BF16_ENV = "GPT_TOOLKIT_CPU_BF16"  # 1 or 0: take the CPU as having bf16 in hardware, or not (for testing)


def cpu_has_native_bf16():
    """True when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16) faster than float32, where
    bf16 autocast pays. On x86 the CPU's own feature flags come first: oneDNN also reports bf16 support on AVX512 CPUs
    without them, where it emulates bf16 several times slower than float32. Elsewhere (ARM) oneDNN's answer. Then a
    short matmul race: some CPUs with AVX512-BF16 (an Intel Xeon with AMX hidden) multiply bf16 at half float32's
    rate. GPT_TOOLKIT_CPU_BF16=1 or =0 overrides the detection, so a machine of either kind can run what the other
    would."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UserError(f"{CPU_BF16_ENV}={forced!r}: set it to 1 (bf16 in hardware) or 0 (none), or unset it")
    return _detected_cpu_bf16()


@functools.cache
def cpu_name():
    """The CPU's model name and the bf16 units it shows (for benchmark output: every figure names its machine)."""
    name = platform.processor() or platform.machine()
    info = system.cpu_info()
    if "model name" in info:
        name = f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    units = [f for f in ("amx_bf16", "avx512_bf16") if cpu_flags().get(f)]
    return f"{name}, {os.cpu_count()} cores, {' + '.join(units) if units else 'no bf16 units'}"


def cpu_flags():
    """torch's view of this CPU: its instruction-set flags (avx2, avx512_bf16, amx_bf16, ...), {} where unknown."""
    try:
        return torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return {}


BF16_MUST_BEAT = 1.25  # bf16 matmuls must be this much faster than float32's for auto to pick bf16


@functools.cache  # measured once per process
def _detected_cpu_bf16():
    return cpu_bf16_units() and cpu_bf16_matmul_speedup() >= BF16_MUST_BEAT


def cpu_bf16_units():
    """Whether this CPU has bf16 matmul instructions at all (AVX512-BF16 or AMX-BF16 on x86, oneDNN's word on ARM)."""
    flags = cpu_flags()
    if flags.get("architecture") in ("x86_64", "x86", "AMD64"):
        return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_matmul_speedup(n=512, rounds=3, seconds=0.02):
    """bf16's matmul FLOP/s over float32's on this CPU: the best of each, the two alternated so that a busy moment
    hits both (about 0.1 s; docs/training.md has the figures that set BF16_MUST_BEAT)."""
    best = {"float32": 0.0, "bfloat16": 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], square_matmul_flops("cpu", dtype, n, seconds))
    return best["bfloat16"] / best["float32"]


def resolve_dtype(name, device, *, training=False):
    """'auto' -> bfloat16 on CUDA GPUs that support it, else float16 (with GradScaler); on CPU bfloat16 where
    the CPU multiplies bf16 in hardware (AVX512-BF16/AMX) faster than float32, else float32; float32 on MPS, where
    bfloat16 is opt-in (macOS 14 or newer) and float16 is refused for training (no GradScaler there: nanochat's
    choices; sampling in float16 needs none)."""
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
    if name == "float16" and kind == "mps" and training:
        raise UserError("dtype=float16 on MPS would need a GradScaler to train, which the toolkit does not use there: "
                        "use --dtype=float32 (auto) or --dtype=bfloat16 (macOS 14 or newer)")
    if name == "bfloat16" and kind == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UserError("dtype=bfloat16 on MPS needs macOS 14 or newer: use --dtype=float32 (auto), or update macOS")
    return name


def optimizer_math_dtype(device):
    """The precision of Muon's Newton-Schulz iteration: bfloat16 where the device multiplies it fast (where auto
    picks bf16), else float32 (a CPU without bf16 units, and MPS, which refuses ops that mix dtypes)."""
    return torch.bfloat16 if resolve_dtype("auto", device) == "bfloat16" else torch.float32


def dtype_note(dtype, device):
    """A line for the log when the dtype asked for is not one this device is built for, or None."""
    if dtype != "float16" or device_type(device) != "cpu":
        return None
    flags = cpu_flags()
    fp16 = "this CPU has AVX512-FP16/AMX-FP16" if flags.get("avx512_fp16") or flags.get("amx_fp16") else \
        "this CPU has no float16 matmul units: slower than float32 here"
    return (f"note: dtype=float16 on a CPU trains as on a T4 or V100: float16 autocast with a GradScaler that skips "
            f"the steps whose gradients overflow ({fp16}); --dtype=auto picks {resolve_dtype('auto', device)}")


def resolve_compile(flag, device):
    """'auto' compiles on CUDA only (on CPU and MPS compile time is rarely won back), and not on Windows, where torch
    has no Triton to compile for the GPU with. True asks for it anywhere (a failure falls back to eager, once)."""
    if flag == "auto":
        return device_type(device) == "cuda" and not system.is_windows()
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
    """Best FLOP/s of an n x n matmul seen in `seconds` of repeats (at least one)."""
    return max(matmul_rates(device, dtype, n, seconds))


def matmul_rates(device, dtype, n, seconds, warm=0):
    """FLOP/s of each timing of an n x n matmul over `seconds`: the first, cold one, then at least `warm` more. Their
    best is the device's practical speed; the median of the warm ones (rates[1:]) how fast it runs now, beside
    whatever else loads it. The operands come from a private generator: a draw from the global RNG here would change
    the dropout masks of the run that measures (and break its exact resume)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype], generator=gen)
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype], generator=gen)
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    a @ b
    synchronize(device)
    rates = [2 * n**3 / (time.perf_counter() - t0)]
    while time.perf_counter() < deadline or len(rates) < 1 + warm:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        rates.append(4 * 2 * n**3 / (time.perf_counter() - t0))
    return rates


def memory_in_use(device):
    """Bytes in use now: CUDA's allocator on GPU, the process's resident set on CPU."""
    if device_type(device) == "cuda":
        return torch.cuda.memory_allocated(device)
    resident = system.resident_bytes()
    if resident is None:
        raise UserError(f"the resident memory of a process cannot be read on {system.kind()}: measure on Linux")
    return resident


def reset_peak_memory(device):
    """Start a new peak-memory measurement (on CPU: reset Linux's resident-set high-water mark)."""
    if device_type(device) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    if not system.reset_peak_resident():
        raise UserError("measuring peak memory on CPU needs Linux's /proc/self/clear_refs: measure on Linux")


def peak_memory(device):
    """Peak bytes since reset_peak_memory."""
    if device_type(device) == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = system.peak_resident()
    if peak is None:
        raise UserError("no VmHWM in /proc/self/status: cannot read the peak memory on this system")
    return peak


def gpu_spec_peaks(name):
    """{dtype: FLOP/s} of the longest GPU_PEAK_FLOPS name found as whole words in the device name ("A100" is not in
    "RTX A1000", "H200" not in "GH200"); {} for an unknown GPU."""
    matches = [(key, peaks) for key, peaks in GPU_PEAK_FLOPS
               if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", name, flags=re.IGNORECASE)]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else {}


CACHE_ENV = "GPT_TOOLKIT_CACHE"  # where the toolkit keeps what it measured once (default ~/.cache/gpt-toolkit)


@functools.cache  # once per process
def peak_flops(device, dtype):
    """(FLOP/s, where the figure comes from) for MFU: a spec table for known GPUs; on a CPU the matmul peak measured
    when the machine was quiet, kept in the cache (peak_cache_path) so that a run on a busy machine uses it rather
    than its own start-up race (a busy machine measured 55-80% MFU, and once 0.00 TFLOP/s). A CPU without a cached
    figure measures now, and keeps the figure only when the machine is quiet; busy, its cores' FMA rate stands in
    when it is higher."""
    if device_type(device) == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = gpu_spec_peaks(name)
        if dtype in peaks:
            return peaks[dtype], f"{name} {dtype} spec"
    if device_type(device) != "cpu":
        return measure_matmul_flops(device, dtype), f"measured {dtype} matmul on {device}"
    key, cache = f"{cpu_name()}; {torch.get_num_threads()} threads; {dtype}; torch {torch.__version__}", read_peak_cache()
    if isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return cache[key], f"{dtype} matmul measured on this CPU when it was quiet, kept in {peak_cache_path()}"
    busy = machine_is_busy()
    measured, rate = measure_matmul_flops(device, dtype), cpu_fma_flops()
    if rate and measured < rate[0] / 10:  # a load the average has not caught yet (once 0.00 TFLOP/s): kept nowhere
        return rate[0], (f"{rate[1]}: the measured {dtype} matmul, {flops_text(measured)}, is too low to be this "
                         f"CPU's peak (a busy machine?)")
    if not busy and not machine_is_busy():
        write_peak_cache({**cache, key: measured})
        return measured, f"measured {dtype} matmul on {device}"
    if rate and measured < rate[0]:
        return rate[0], (f"{rate[1]}: the machine is busy, and its measured {dtype} matmul, {flops_text(measured)}, is "
                         f"not its peak")
    return measured, f"measured {dtype} matmul on {device}, a busy machine (MFU may read high)"


def machine_is_busy():
    """True when the last minute's load average is above half this process's cores (other work shares them), False
    where the load is unknown (Windows)."""
    load = system.load_average()
    return load is not None and load > system.usable_cores() / 2


def peak_cache_path():
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt-toolkit") / "peak_flops.json"


def read_peak_cache():
    """{key: FLOP/s} measured on quiet machines, {} when there is none (or it cannot be read: it is only a cache)."""
    try:
        cache = json.loads(peak_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def write_peak_cache(cache):
    """Keep the figures (atomically); a cache that cannot be written is skipped: the next run measures again."""
    path = peak_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1))
    except (OSError, UserError):
        pass


def cpu_fma_flops():
    """(float32 FLOP/s, how) of this process's cores at their clock: 2 x the float32 lanes of an FMA per cycle (AVX512
    16, AVX2 8), one FMA unit counted; None where the clock or the vector width is unknown."""
    flags = cpu_flags()
    try:
        mhz = float(system.cpu_info()["cpu MHz"])
    except (KeyError, ValueError):
        return None
    lanes = 16 if flags.get("avx512_f") else 8 if flags.get("avx2") and flags.get("fma3") else 0
    if not lanes or mhz <= 0:
        return None
    cores = system.usable_cores()
    return cores * mhz * 1e6 * 2 * lanes, f"{cores} cores x {mhz / 1000:.2f} GHz x {2 * lanes} float32 FLOP per cycle"


def flops_text(flops):
    """'1.25 TFLOP/s', or in GFLOP/s below one TFLOP/s (a CPU's figure is not 0.00)."""
    return f"{flops / 1e12:.2f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"
