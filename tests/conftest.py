"""Shared fixtures: tiny-shakespeare prepared once per session in a temp dir, and script runners.

The text comes from data/shakespeare_char/input.txt (.ci/run copies it there; a real user's first
prepare.py run downloads it). Tests never write into the toolkit's own data/ directory."""
import contextlib
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# pytest-xdist runs the suite on every core (pyproject's addopts): one OpenMP thread per worker, and in the scripts
# a test starts, so the workers do not fight over the cores (measured: 1.8x faster on 2 cores than one worker of two
# threads). Set before torch loads OpenMP; a user's own setting stays.
# the toolkit's cache (a CPU's quiet matmul peak): the tests' own, never the user's ~/.cache/gpt-toolkit
os.environ["GPT_TOOLKIT_CACHE"] = tempfile.mkdtemp(prefix="gpt-toolkit-test-cache-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from gpt_toolkit.core.errors import run_main  # noqa: E402
from gpt_toolkit.core.hardware import resolve_dtype  # noqa: E402
from gpt_toolkit.core.tokenizer import TINY_SHAKESPEARE_URL, download, read_text  # noqa: E402
from gpt_toolkit.data.preparing import TextSource, prepare_dataset  # noqa: E402

# A model small enough that a training run takes a couple of seconds on 2 CPU cores. It pins the size of the run
# only: dtype, compile, the MFU peak and the speed features stay at the defaults a user gets (a suite that pinned
# --dtype and --peak_flops once hid a broken exact resume on every default run). --device=cpu is what auto picks
# on CI; it keeps a developer's GPU machine on the same path.
TINY_TRAIN = ["--dataset=shakespeare_char", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
              "--batch_size=8", "--gradient_accumulation_steps=1", "--eval_iters=4", "--log_interval=10",
              "--warmup_iters=5", "--lr_decay_iters=60", "--max_iters=60", "--eval_interval=20",
              "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu"]
# A torchrun run of TINY_TRAIN: dropout off, so that one process can be compared with two (each process draws its own
# masks); float32, the precision of the DDP-FSDP agreement
DDP_RUN = ["config/train_shakespeare_char.py", *TINY_TRAIN, "--gradient_accumulation_steps=4", "--max_iters=20",
           "--lr_decay_iters=20", "--eval_interval=10", "--log_interval=1", "--dropout=0", "--dtype=float32"]
# What dtype=auto gives on this CPU, and the other CPU training precision, whose code path differs (autocast,
# the explicit bf16 attention): the headline guarantees are tested in both, and in float16 (the GradScaler path
# that T4/V100 cards get from auto).
AUTO_DTYPE = resolve_dtype("auto", "cpu")
OTHER_DTYPE = "float32" if AUTO_DTYPE == "bfloat16" else "bfloat16"


def build_dataset(text, out_dir, tokenizer="char", val_fraction=0.1, progress=False, num_proc=1):
    """prepare_dataset of a string, by way of a temporary file (prepare.py's path from a file on disk)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.txt"
        path.write_text(text, encoding="utf-8")
        return prepare_dataset(TextSource(path), out_dir, tokenizer, val_fraction=val_fraction, num_proc=num_proc,
                               progress=progress)


def drop_file_list(dataset_dir):
    """Make a prepared dataset look hand-made (or made by nanoGPT's scripts): no list of its files in meta.json, so
    its .bin files can be edited and the other checks reached."""
    meta_path = Path(dataset_dir) / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.pop("files", None)
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_text():
    path = ROOT / "data" / "shakespeare_char" / "input.txt"
    if not path.exists():
        download(TINY_SHAKESPEARE_URL, path)
    return read_text(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, shakespeare_text):
    """A data directory holding shakespeare_char (char vocabulary), as prepare.py writes it."""
    root = tmp_path_factory.mktemp("data")
    build_dataset(shakespeare_text, root / "shakespeare_char", "char", progress=False)
    return root


# Entry points run in this process by run_script: the same main() and run_main() as `python SCRIPT`, without
# an interpreter start-up (and torch import) per call.
IN_PROCESS = {"train.py": "train", "sample.py": "sample", **{f"tools/{name}.py": f"tools.{name}" for name in (
    "plot_loss", "summarize_experiments", "compare_runs", "plot_lr", "report", "sweep", "lr_finder", "grad_viz",
    "estimate", "debug_training", "bench", "experiment", "evaluate", "export_hf", "time_to_quality", "export_gguf",
    "merge_lora", "doctor")},
    "data/prepare_text.py": "data.prepare_text", "data/prepare_chat.py": "data.prepare_chat"}


def run_script(*args, cwd=ROOT, timeout=300, env=None, subprocess_only=False, guard=None):
    """Run one of the toolkit's scripts (path relative to the toolkit root) as `python SCRIPT ARGS` would:
    in this process when it has a main() (listed above), else, or with env or subprocess_only, in a new one.
    guard: for train.py, a guards.Guard its loop runs with after its own (a test's fault or observer goes there)."""
    script, rest = args[0], [str(a) for a in args[1:]]
    if script in IN_PROCESS and env is None and not subprocess_only:
        return _run_in_process(IN_PROCESS[script], rest, cwd, {"guards": [guard]} if guard else {})
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *rest], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def torchrun_commands(*args, nproc=2, nodes=1):
    """The command lines of `torchrun --standalone --nproc_per_node=NPROC ARGS`; with nodes=2, of two torchrun "nodes"
    of nproc processes each on 127.0.0.1 (--nnodes=2 --node_rank=0|1 --master_addr --master_port), as a two-machine
    job is launched (node 0's first)."""
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nodes == 1:
        return [[*base, "--standalone", *map(str, args)]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [[*base, f"--nnodes={nodes}", f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}",
             *map(str, args)] for i in range(nodes)]


def run_torchrun(*args, nproc=2, nodes=1, timeout=300):
    """torchrun_commands run to the end. Returns node 0's result; a failure fails the test (see wait_all)."""
    return wait_all(torchrun_commands(*args, nproc=nproc, nodes=nodes), timeout)[0]


def run_torchrun_together(*jobs, nproc=2, timeout=300):
    """Several independent standalone torchrun jobs (each a list of arguments) at once: their start-up (an interpreter
    and torch per process) overlaps. Returns their results in order."""
    return wait_all([command for job in jobs for command in torchrun_commands(*job, nproc=nproc)], timeout)


def wait_all(commands, timeout, *, preexec_fns=None, check=True):
    """Run the commands at once and wait for all (preexec_fns: one per command, or None). With check, a non-zero
    exit fails the test with the exit code, the (last 20) stderr lines that name an error, then stderr's tail: a
    tail alone can cut off the cause. A job still running after `timeout` s (a slow machine, or a process waiting in
    a collective the others never join) fails the test, and is stopped."""
    preexec_fns = preexec_fns or [None] * len(commands)
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=fn, start_new_session=True) for cmd, fn in zip(commands, preexec_fns)]
    results, deadline = [], time.monotonic() + timeout
    for cmd, proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            tails = [r.stderr[-1500:] for r in results]  # what each had said: a slow machine or a hang, and where
            for other in procs[len(results):]:
                other.terminate()  # torchrun stops its workers (each in a session of its own, out of its group)
            for other in procs[len(results):]:
                try:
                    tails.append(other.communicate(timeout=60)[1][-1500:])
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(other.pid, signal.SIGKILL)
                    tails.append(other.communicate()[1][-1500:])
            pytest.fail(f"torchrun still running after {timeout} s, stopped; stderr of each:\n" + "\n---\n".join(tails))
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    if not check:
        return results
    for r in results:
        if r.returncode != 0:
            named = [line for line in r.stderr.splitlines() if "Error" in line or "error:" in line]
            pytest.fail(f"torchrun exited {r.returncode}\nerror lines:\n" + "\n".join(named[-20:])
                        + f"\n--- stderr tail ---\n{r.stderr[-3000:]}")
    return results


def signal_and_time(proc, sig, timeout=120):
    """Send proc the signal and wait for its end: (stdout, stderr, took, bound). took: the seconds from the signal to
    its end. bound: what "at once" means on this machine now, whatever its load: twice the time a Python process that
    imports torch, started beside the stop, takes to start and end (about 1 s on a quiet 2-core machine; several on a
    busy one, as the stop itself takes longer there), and never under 2 s. A stop that waited for its phase to end (a
    BPE's training, an evaluation) takes longer than that, on a quiet machine and a busy one alike. The strict figure,
    a quiet machine's, is tools/bench_stops.py's."""
    yardstick = subprocess.Popen([sys.executable, "-c", "import torch"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    ended = []

    def watch():
        try:
            yardstick.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a machine this busy: the yardstick goes, the bound is the timeout's
            yardstick.kill()
            yardstick.wait()
        ended.append(time.monotonic())
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)  # only against a hang
    took = time.monotonic() - t0
    watcher.join()
    bound = max(2.0, 2 * (ended[0] - t0))
    print(f"stopped {took:.2f} s after {signal.Signals(sig).name}; at once here: within {bound:.2f} s")
    return out, err, took, bound


def _run_in_process(module_name, argv, cwd, options):
    main = importlib.import_module(module_name).main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), determinism_kept():
        try:
            run_main(lambda argv: main(argv, **options), argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess([module_name, *argv], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def determinism_kept():
    """A run that compiles on CPU turns on torch's deterministic algorithms for its process (setup_process): a run
    in this process must leave them as a user's next process finds them, off, for the tests after it."""
    import torch
    import torch.utils.deterministic
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def assert_one_line_error(result, *fragments, code=None):
    """A user error: non-zero exit, one 'error: ...' line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]
