"""Windows and macOS, by SIMULATION (issue 54): each job runs in a Python that tests/simulate/sitecustomize.py made to
lack what that platform lacks (no fcntl and a stand-in msvcrt, no O_NOFOLLOW, no libc through ctypes, no /proc, the
spawn start method, a GBK default encoding on Windows; see that file). What differs on the real systems and is not
simulated: the C libraries, torch's build, the console itself. The same jobs on Linux give the same numbers."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, TINY_TRAIN

SIMULATE = ROOT / "tests" / "simulate"
PLATFORMS = ["windows", "macos"]
# float32: the bf16 race (dtype=auto) is measured per process, and one process may call it differently
RUN = ["train.py", "config/train_shakespeare_char.py", *TINY_TRAIN, "--dtype=float32", "--dropout=0"]


def env_for(platform):
    """The environment of a process that runs as on `platform` (None: Linux, as it is)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GPT_TOOLKIT_SIMULATE", None)
    if platform:
        env.update(GPT_TOOLKIT_SIMULATE=platform, PYTHONPATH=os.pathsep.join(
            [str(SIMULATE), *filter(None, [env.get("PYTHONPATH")])]))
        if platform == "windows":
            env["PYTHONIOENCODING"] = "gbk"  # a Chinese Windows' console code page, as when piped to tee
    return env


def run(platform, *args, timeout=300, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          encoding="gbk" if platform == "windows" else "utf-8", timeout=timeout,
                          env=env_for(platform), **kw)


def losses(output):
    """Every logged loss: (step, train, val) of the evaluations and (iter, loss) of the iter lines."""
    return (re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", output),
            re.findall(r"iter (\d+): loss ([\d.]+)", output))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_simulation_takes_away_what_the_platform_lacks(platform):
    """The shim is in force (else every test below would only run Linux again), and the toolkit's system module sees
    the platform it simulates."""
    code = """
import ctypes, json, os, signal, sys
sys.path.insert(0, '.')
from gpt_toolkit.core import system
facts = {"kind": system.kind(), "forks": system.forks(), "stop": [int(s) for s in system.stop_signals()],
         "nofollow": hasattr(os, "O_NOFOLLOW"), "sigmask": hasattr(signal, "pthread_sigmask"),
         "memory": system.available_memory()[0] is not None, "cpuinfo": bool(system.cpu_info()),
         "mallopt": system.keep_freed_memory()}
with open("README.md", encoding="utf-8") as f:
    facts["holder"] = system.lock_holder(f)
try:
    import fcntl
    facts["fcntl"] = True
except ImportError:
    facts["fcntl"] = False
try:
    ctypes.CDLL("libc.so.6")
    facts["libc"] = True
except OSError:
    facts["libc"] = False
try:
    open("/proc/self/status")
    facts["proc"] = True
except FileNotFoundError:
    facts["proc"] = False
with open("t.txt", "w") as f:
    facts["encoding"] = f.encoding
os.remove("t.txt")
print(json.dumps(facts))
"""
    r = run(platform, "-c", code, timeout=120)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    common = {"forks": False, "proc": False, "libc": False, "cpuinfo": False, "mallopt": False, "holder": None}
    if platform == "windows":
        assert facts == {**common, "kind": "windows", "stop": [2, 15, 21], "nofollow": False, "sigmask": False,
                         "memory": False, "fcntl": False, "encoding": "gbk"}
    else:
        facts.pop("encoding")  # the locale's, as on Linux: UTF-8 on a Mac
        assert facts == {**common, "kind": "macos", "stop": [2, 15], "nofollow": True, "sigmask": True,
                         "memory": False, "fcntl": True}


@pytest.fixture(scope="module")
def linux_run(data_dir, tmp_path_factory):
    """The main job on Linux, as it is: 40 steps, then resumed to 60; its output."""
    out = tmp_path_factory.mktemp("linux") / "run"
    first = run(None, *RUN, "--max_iters=40", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert first.returncode == 0, first.stderr
    second = run(None, *RUN, "--max_iters=60", "--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert second.returncode == 0, second.stderr
    return out, first.stdout + second.stdout


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_main_job_trains_and_resumes_with_linuxs_losses(platform, linux_run, data_dir, tmp_path):
    out = tmp_path / "run"
    first = run(platform, *RUN, "--max_iters=40", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert first.returncode == 0, first.stderr
    second = run(platform, *RUN, "--max_iters=60", "--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout + second.stderr
    evaluations, iters = losses(first.stdout + second.stdout)
    assert len(evaluations) == 4 and len(iters) == 6  # steps 0, 20, 40 (40 again at the resume's start), 60 ...
    assert (evaluations, iters) == losses(linux_run[1])  # ... each as on Linux


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_sample_py_writes_linuxs_text(platform, linux_run):
    args = ["sample.py", f"--out_dir={linux_run[0]}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=60"]
    here, there = run(None, *args), run(platform, *args)
    assert there.returncode == 0, there.stderr
    assert there.stdout == here.stdout and "ROMEO:" in there.stdout


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_prepare_on_spawned_workers_writes_linuxs_files(platform, shakespeare_text, tmp_path):
    """Workers spawn there (a fresh interpreter each: the worker functions imported, their arguments pickled); the
    dataset is the same, byte for byte, and Chinese text survives a GBK default encoding."""
    source = tmp_path / "input.txt"
    source.write_text("第一章 风起。\n" * 200 + shakespeare_text[:300_000] + "終わり 🌸\n", encoding="utf-8")
    made = {}
    for name in (None, platform):
        data = tmp_path / f"data-{name or 'linux'}"
        r = run(name, "data/prepare_text.py", f"--input={source}", "--name=mixed", "--num_proc=2",
                f"--data_dir={data}")
        assert r.returncode == 0, r.stderr
        assert "2 process(es)" in r.stdout + r.stderr
        made[name] = {p.name: p.read_bytes() for p in (data / "mixed").iterdir() if p.suffix in (".bin", ".json")}
    assert made[platform] == made[None]
    vocabulary = json.loads(made[platform]["meta.json"])
    assert {"第", "风", "終", "🌸"} <= set(vocabulary["itos"])


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_second_run_on_the_same_out_dir_is_refused_in_one_line(platform, data_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, *RUN, "--max_iters=100000", "--eval_interval=100000",
                              f"--data_dir={data_dir}", f"--out_dir={out}"], cwd=ROOT, env=env_for(platform),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                             errors="replace")
    try:
        for line in first.stdout:  # the lock is taken before the first step
            if line.startswith("iter 0:"):
                break
        second = run(platform, *RUN, "--max_iters=10", f"--data_dir={data_dir}", f"--out_dir={out}")
        assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"pid {first.pid} " in errors[0] and "is being written by" in errors[0], errors
    finally:  # Windows: the console's Ctrl-Break (SIGBREAK), which Linux does not have; macOS: Ctrl-C
        stop = 21 if platform == "windows" else signal.SIGINT
        first.send_signal(stop)
        rest = first.communicate(timeout=120)[0]
    assert first.returncode == 128 + stop and "saving checkpoint" in rest, rest  # saved, then stopped


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_server_starts_serves_and_stops_on_ctrl_c(platform, linux_run):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "tools/serve.py", f"--out_dir={linux_run[0]}", f"--port={port}"],
                              cwd=ROOT, env=env_for(platform), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, encoding="utf-8", errors="replace")
    try:
        deadline = time.monotonic() + 180  # only against a hang: a busy machine loads torch slowly
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    models = json.loads(r.read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1]
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == [linux_run[0].name]
        body = json.dumps({"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 5
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert out.startswith("serving ") and "Traceback" not in err, (out, err)


@pytest.mark.slow
def test_chinese_text_prints_to_a_gbk_console_and_what_gbk_lacks_is_a_question_mark(tmp_path):
    """A Chinese Windows' console (or `| tee` there) writes GBK: Chinese prints, an emoji cannot be written in GBK
    and shows as '?' instead of ending sample.py with a UnicodeEncodeError."""
    source = tmp_path / "input.txt"
    source.write_text("第一章 风起。🌸\n" * 2000, encoding="utf-8")
    r = run(None, "data/prepare_text.py", f"--input={source}", "--name=zh", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    r = run(None, *RUN, "--dataset=zh", "--max_iters=10", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr
    args = ["sample.py", f"--out_dir={tmp_path / 'run'}", "--start=第一章 🌸", "--num_samples=1", "--max_new_tokens=5"]
    r = run("windows", *args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("第一章 ?"), r.stdout
    bare = run("windows", "-c", "print('第一章 🌸')")  # the same console without the toolkit's start: Python's error
    assert bare.returncode != 0 and "UnicodeEncodeError" in bare.stderr


# ------------------------------------------------------------------ MPS and Windows by design: the choices, as units

@pytest.fixture
def on_a_mac(monkeypatch):
    """A machine whose torch has MPS (Apple silicon) and no CUDA, as torch reports it."""
    import torch
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    monkeypatch.setattr("platform.system", lambda: "Darwin")


def test_mps_is_auto_with_float32_no_scaler_no_compile_and_float32_optimizer_math(on_a_mac):
    import torch

    from gpt_toolkit.core import hardware
    device = hardware.resolve_device("auto")
    assert device == "mps"
    assert hardware.resolve_dtype("auto", device) == "float32"  # bf16 is opt-in
    assert hardware.resolve_dtype("bfloat16", device) == "bfloat16"
    assert hardware.resolve_compile("auto", device) is False and hardware.resolve_compile(True, device) is True
    assert hardware.optimizer_math_dtype(device) == torch.float32  # Muon's Newton-Schulz: no mixed-dtype ops
    assert not hardware.grad_scaler(device, "float32").is_enabled()
    assert not hardware.grad_scaler(device, "bfloat16").is_enabled()


def test_mps_refuses_float16_and_bf16_before_macos_14(on_a_mac, monkeypatch):
    import torch

    from gpt_toolkit.core import hardware
    from gpt_toolkit.core.errors import UserError
    with pytest.raises(UserError, match=r"float16 on MPS would need a GradScaler to train.*--dtype=float32"):
        hardware.resolve_dtype("float16", "mps", training=True)
    assert hardware.resolve_dtype("float16", "mps") == "float16"  # sampling needs no GradScaler
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    with pytest.raises(UserError, match="bfloat16 on MPS needs macOS 14"):
        hardware.resolve_dtype("bfloat16", "mps")


def test_batches_are_pinned_for_cuda_only(monkeypatch):
    import torch

    from gpt_toolkit.data import dataset
    pinned, moved = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(1) or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: moved.append(a) or t)
    for device in ("mps", "cuda:0"):
        dataset._to_device(torch.zeros(2), device)
    assert pinned == [1] and moved == [("mps",), ("cuda:0",)]  # MPS has no pinned memory


def test_mps_memory_is_the_systems_when_that_is_lower(on_a_mac, monkeypatch):
    """Unified memory: Metal's recommended working set is the most a run may take, the system's free RAM when less."""
    import torch

    from gpt_toolkit.core import system
    from gpt_toolkit.models import memory
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 << 30)
    monkeypatch.setattr(system, "available_memory", lambda: (5 << 30, "free and inactive RAM (unified)"))
    assert memory.available_memory("mps") == (5 << 30, "free and inactive RAM (unified), shared with the GPU (less "
                                                       "than Metal's recommended working set)")
    monkeypatch.setattr(system, "available_memory", lambda: (30 << 30, "free and inactive RAM (unified)"))
    assert memory.available_memory("mps") == (16 << 30, "Metal's recommended working set")


def test_a_missing_mps_op_names_the_fallback_variable_in_one_line(capsys):
    from gpt_toolkit.core.errors import run_main

    def main(argv):  # torch's words for an op MPS lacks
        raise NotImplementedError("The operator 'aten::_fft_r2c' is not currently implemented for the MPS device. If "
                                  "you want this op to be added in priority during the prototype phase of this feature, "
                                  "please comment on https://github.com/pytorch/pytorch/issues/77764. As a temporary "
                                  "fix, you can set the environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` ...")
    with pytest.raises(SystemExit) as stop:
        run_main(main, [])
    assert stop.value.code == 1
    assert capsys.readouterr().err == ("error: aten::_fft_r2c is not implemented on MPS: set "
                                       "PYTORCH_ENABLE_MPS_FALLBACK=1 to run it on the CPU (slower), or use --device=cpu\n")


def test_windows_compiles_nothing_by_default_and_joins_torchrun_with_gloo_without_libuv(monkeypatch):
    from gpt_toolkit.core import hardware
    from gpt_toolkit.core.errors import ConfigError
    from gpt_toolkit.training import distributed
    monkeypatch.setattr("platform.system", lambda: "Windows")
    assert hardware.resolve_compile("auto", "cuda:0") is False  # no Triton there
    assert hardware.resolve_compile(True, "cuda:0") is True  # asked for: tried, with the eager fallback
    assert distributed.pick_backend("auto", "cuda:0") == "gloo" and distributed.pick_backend("auto", "cpu") == "gloo"
    with pytest.raises(ConfigError, match="nccl does not exist on Windows: use --backend=gloo"):
        distributed.pick_backend("nccl", "cuda:0")
    joined = {}
    monkeypatch.setenv("USE_LIBUV", "unset")  # recorded, so that the test leaves the variable as it found it
    monkeypatch.delenv("USE_LIBUV")
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend: joined.update(backend=backend, libuv=os.environ.get("USE_LIBUV")))
    distributed.init_process_group("auto", "cpu", 2)
    assert joined == {"backend": "gloo", "libuv": "0"}
    monkeypatch.setattr("platform.system", lambda: "Linux")  # and Linux as before
    assert hardware.resolve_compile("auto", "cuda:0") is True and distributed.pick_backend("auto", "cuda:0") == "nccl"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_doctor_says_how_the_toolkit_meets_the_platform(platform):
    r = run(platform, "tools/doctor.py", "--smoke=False", timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[1]
    assert line == {
        "windows": "system: windows; locks msvcrt, workers spawn, stop signals SIGINT/SIGTERM/SIGBREAK, text files "
                   "utf-8 (the default here: cp936), console gbk",
        "macos": "system: macos; locks fcntl, workers spawn, stop signals SIGINT/SIGTERM, text files utf-8 (the "
                 f"default here: {r.stdout.split('the default here: ')[1].split(')')[0]}), console utf-8"}[platform]
    assert "memory: unknown available" in r.stdout  # no /proc/meminfo, and the simulation has no vm_stat nor Win32


def test_windows_locks_a_byte_past_the_record_and_unlocks_before_closing(tmp_path, monkeypatch):
    """Windows' byte-range locks are mandatory: a refused run must still read the holder's record at the file's
    start, so the lock lies at system.LOCK_OFFSET; and a closed file's lock lingers there, so each lock is given back
    before its file closes (check_free, then acquire, in one process)."""
    from gpt_toolkit.core import system
    from gpt_toolkit.core.locking import DirectoryLock
    calls = []

    class Msvcrt:  # Windows' msvcrt.locking, recorded
        LK_UNLCK, LK_NBLCK = 0, 2

        @staticmethod
        def locking(fd, mode, nbytes):
            calls.append((mode, os.lseek(fd, 0, os.SEEK_CUR), nbytes))
    monkeypatch.setattr(system, "fcntl", None)
    monkeypatch.setattr(system, "msvcrt", Msvcrt)
    lock = DirectoryLock(tmp_path, what="out_dir", fix="")
    lock.check_free()  # no lock file yet: nothing locked
    lock.acquire()
    lock.release()
    lock.check_free()
    at = system.LOCK_OFFSET
    assert calls == [(2, at, 1), (0, at, 1), (2, at, 1), (0, at, 1)]
    assert (tmp_path / ".gpt-toolkit.lock").read_text(encoding="utf-8").startswith(f"pid {os.getpid()} (")


def test_windows_opens_the_toolkits_files_untranslated(monkeypatch):
    """os.open's files are in text mode on Windows unless O_BINARY: training.log would get \\r\\n line ends."""
    from gpt_toolkit.core import system
    monkeypatch.setattr(os, "O_BINARY", 0x8000, raising=False)
    assert system.no_follow_flags()[0] & 0x8000


def test_windows_reads_checkpoints_whole_instead_of_mapping_them(tmp_path, monkeypatch):
    """A mapped file cannot be replaced there: a server mapping ckpt.pt would stop training's next save."""
    import torch

    from gpt_toolkit.models import checkpoint
    torch.save({"x": torch.zeros(2)}, tmp_path / "c.pt")
    mapped = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: mapped.append(k.get("mmap", False)) or real(*a, **k))
    checkpoint._load(tmp_path / "c.pt", "cpu", True)
    monkeypatch.setattr("platform.system", lambda: "Windows")
    checkpoint._load(tmp_path / "c.pt", "cpu", True)
    assert mapped == [True, False]


def test_windows_asks_win32_whether_a_process_runs(monkeypatch):
    """Not os.kill(pid, 0), a Ctrl-C there: OpenProcess and GetExitCodeProcess."""
    import ctypes

    from gpt_toolkit.core import system
    state = {}

    class Kernel32:
        def OpenProcess(self, access, inherit, pid):
            return state["handle"]

        def GetLastError(self):
            return state["error"]

        def GetExitCodeProcess(self, handle, code):
            code._obj.value = state["code"]
            return 1

        def CloseHandle(self, handle):
            state["closed"] = handle
    monkeypatch.setattr(ctypes, "windll", type("windll", (), {"kernel32": Kernel32()})(), raising=False)
    monkeypatch.setattr("platform.system", lambda: "Windows")
    monkeypatch.setattr(os, "kill", lambda pid, sig: pytest.fail("os.kill on Windows"))
    answers = []
    for handle, error, code in [(0, 87, None), (0, 5, None), (7, 0, 259), (7, 0, 1)]:
        state.update(handle=handle, error=error, code=code)
        answers.append(system.process_alive(os.getpid() + 1))
    assert answers == [False, True, True, False] and state["closed"] == 7


def test_linux_workers_fork_and_the_others_spawn(monkeypatch):
    from gpt_toolkit.core import system
    assert system.forks() and system.child_context().get_start_method() == "fork"
    for name in ("Darwin", "Windows"):
        monkeypatch.setattr("platform.system", lambda name=name: name)
        assert not system.forks() and system.child_context().get_start_method() == "spawn"
