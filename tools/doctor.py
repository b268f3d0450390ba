"""What this machine is and what the toolkit picks on it, in one screen to paste into an issue.

    python tools/doctor.py [--smoke=True]

The operating system and how the toolkit meets it (locks, worker processes, signals, text encoding), Python, the
torch build (its CUDA and MPS), the device, dtype and compile setting that `auto` picks here and why (the bf16 matmul
race on a CPU), the threads and OpenMP settings, free memory and disk, the packages' versions, whether the offline
data (tinyshakespeare's input.txt, the tiktoken cache) is found, and a smoke step: one training step and one
generated token of a tiny model on the picked device, timed (about 5 seconds). Nothing is written (the smoke step
trains in memory).
"""
import importlib.metadata
import locale
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit.core import hardware, system
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import run_main
from gpt_toolkit.models.memory import available_memory, fmt_bytes
from model import GPT, GPTConfig

TIKTOKEN_CACHE_ENV = "TIKTOKEN_CACHE_DIR"  # tiktoken's own variable
PACKAGES = ["torch", "numpy", "tiktoken", "matplotlib", "tabulate", "tqdm", "transformers", "tokenizers",
            "safetensors", "fastapi", "uvicorn", "peft", "gguf", "openai", "lm_eval", "llama_cpp_python", "pytest"]


def version(name):
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_lines():
    yield f"os: {platform.platform()} ({platform.machine()}), python {platform.python_version()} ({sys.executable})"
    signals = "/".join(system.signal_name(sig) for sig in system.stop_signals())
    yield (f"system: {system.kind()}; locks {'fcntl' if system.fcntl else 'msvcrt'}, workers "
           f"{'fork' if system.forks() else 'spawn'}, stop signals {signals}, text files utf-8 (the default here: "
           f"{locale.getpreferredencoding(False)}), console {sys.stdout.encoding}")
    cuda = f"cuda {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.version.cuda else "no cuda build"
    mps = "mps available" if torch.backends.mps.is_available() else "no mps"
    yield f"torch: {torch.__version__} ({cuda}; {mps})"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            yield f"  cuda:{i}: {torch.cuda.get_device_name(i)}"
    yield f"cpu: {hardware.cpu_name()}"
    omp = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
           if k in os.environ}
    omp_text = " ".join(f"{k}={v}" for k, v in omp.items()) or "no OpenMP variables set"
    yield f"threads: torch {torch.get_num_threads()} of {os.cpu_count()} cores; {omp_text}"


def choice_lines():
    device = hardware.resolve_device("auto")
    dtype = hardware.resolve_dtype("auto", device)
    kind = hardware.device_type(device)
    if kind == "cpu":
        forced = os.environ.get(hardware.CPU_BF16_ENV)
        if forced:
            why = f"{hardware.CPU_BF16_ENV}={forced} decides"
        elif not hardware.cpu_bf16_units():
            why = "no bf16 matmul units on this CPU (AVX512-BF16 or AMX)"
        else:
            why = (f"bf16 matmuls measured {hardware.cpu_bf16_matmul_speedup():.2f}x float32's (auto wants "
                   f">= {hardware.BF16_MUST_BEAT}x)")
    elif kind == "cuda":
        why = "bf16 supported" if dtype == "bfloat16" else "no bf16 on this GPU: float16 with a GradScaler"
    else:
        why = "float32 on MPS unless --dtype asks otherwise"
    yield f"auto picks: device {device}, dtype {dtype} ({why}), compile {hardware.resolve_compile('auto', device)}"
    peak, source = hardware.peak_flops(device, dtype)
    yield f"MFU peak: {hardware.flops_text(peak)} ({source})"
    free, what = available_memory(device)
    yield f"memory: {fmt_bytes(free) if free is not None else 'unknown'} available ({what})"
    disk = shutil.disk_usage(ROOT)
    yield f"disk: {fmt_bytes(disk.free)} free of {fmt_bytes(disk.total)} where the toolkit is ({ROOT})"


def data_lines():
    shakespeare = ROOT / "data" / "shakespeare_char"
    found = "found" if (shakespeare / "input.txt").exists() else "missing (prepare.py downloads it; offline: copy it there)"
    yield f"data: {shakespeare / 'input.txt'} {found}; prepared: {(shakespeare / 'train.bin').exists()}"
    cache = os.environ.get(TIKTOKEN_CACHE_ENV)
    files = len(list(Path(cache).iterdir())) if cache and Path(cache).is_dir() else 0
    yield (f"tiktoken cache: {TIKTOKEN_CACHE_ENV}={cache} ({files} file(s))" if cache else
           f"tiktoken cache: {TIKTOKEN_CACHE_ENV} not set (GPT-2 tokenizing downloads its files once; offline: set it)")
    yield "packages: " + ", ".join(f"{name} {version(name)}" for name in PACKAGES)


def smoke_lines():
    """One training step and one generated token of a tiny model on the picked device, timed."""
    device = hardware.resolve_device("auto")
    dtype = hardware.resolve_dtype("auto", device)
    cuda = [torch.device(device).index or 0] if hardware.device_type(device) == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the caller's random state stays as it was
        torch.manual_seed(0)
        loss, seconds = smoke_step(device, dtype)
    yield (f"smoke: a training step (loss {loss:.3f}, ln(65) = 4.174 expected) and a generated token on {device} in "
           f"{seconds:.2f} s: ok")


def smoke_step(device, dtype):
    """(the first loss, seconds) of one AdamW step and one generated token of a tiny GPT."""
    t0 = time.perf_counter()
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=65, dropout=0.0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 65, (2, 8, 64), device=device)
    with hardware.autocast(device, dtype):
        _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    with torch.no_grad(), hardware.autocast(device, dtype):
        model.generate(x[:1, :8], 1)
    hardware.synchronize(device)
    return loss.item(), time.perf_counter() - t0


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_flag("--smoke", default=True, help="run the smoke step (default True)")
    args, _ = parser.parse(argv)
    sections = [machine_lines, choice_lines, data_lines] + ([smoke_lines] if args.smoke else [])
    for section in sections:
        for line in section():
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
