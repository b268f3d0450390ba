"""A SIMULATION of Windows or macOS on Linux, for tests/test_platforms.py: with this directory on PYTHONPATH and
GPT_TOOLKIT_SIMULATE=windows or =macos, Python imports this module at start-up (site's sitecustomize hook) and
takes away what that platform lacks, so that the toolkit's fallbacks run. It is not the real thing: CPython, torch
and every C library stay Linux builds, sys.platform stays 'linux' (torch reads it to load its libraries), and only
what the toolkit could reach is changed.

Windows (GPT_TOOLKIT_SIMULATE=windows):
  - platform.system() is 'Windows' (to the toolkit's modules; torch and the standard library are told the truth);
  - no fcntl, no resource (importing them fails); an msvcrt whose locking() locks as Windows' does: per open file,
    refused at once (LK_NBLCK) while another holds it;
  - no os.O_NOFOLLOW, os.O_NONBLOCK, os.getloadavg, os.sched_getaffinity, os.sysconf, os.fork (os.register_at_fork
    stays: torch's Linux build registers with it; signal.SIGKILL too: the standard library's Popen.kill uses it);
    an os.O_BINARY; os.kill(pid, 0) fails (there it is a Ctrl-C to the console); no signal.pthread_sigmask; a
    signal.SIGBREAK (21, Ctrl-Break);
  - child processes spawn (no fork start method);
  - no libc through ctypes (CDLL('libc.so.6') and CDLL(None) fail);
  - no /proc and no /sys (opening, listing or stat-ing anything under them is FileNotFoundError);
  - the ANSI code page: a text open() without encoding= reads and writes GBK (cp936), as on a Chinese Windows; the
    tests also set PYTHONIOENCODING=gbk, a console's output piped (to tee): a real console writes UTF-16.
Windows' locks are mandatory (a locked byte cannot be read by others); the stand-in's are not: a unit test checks
where the toolkit puts its lock instead (tests/test_platforms.py).
macOS (GPT_TOOLKIT_SIMULATE=macos):
  - platform.system() is 'Darwin' (to the toolkit's modules); child processes spawn by default (fork is there);
  - no libc.so.6 (ctypes.CDLL('libc.so.6') fails), no os.sched_getaffinity, no /proc, no /sys (as above).
"""
import builtins
import ctypes
import io
import multiprocessing
import os
import platform
import signal
import sys

SIMULATE = os.environ.get("GPT_TOOLKIT_SIMULATE", "")
_real_open = io.open


def _is_hidden(path):
    try:
        text = os.fsdecode(path) if not isinstance(path, int) else ""
    except TypeError:
        return False
    return text == "/proc" or text.startswith(("/proc/", "/sys/"))


def _no_proc_open(default_encoding=None):
    def open_(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
        if _is_hidden(file):
            raise FileNotFoundError(2, "No such file or directory (simulated: no /proc or /sys here)", str(file))
        if default_encoding and "b" not in mode and encoding in (None, "locale"):
            encoding = default_encoding  # the ANSI code page: what open() without encoding= uses there
        return _real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
    return open_


def _no_proc_paths():
    """os.stat (and with it os.path.exists), os.listdir and os.scandir find nothing under /proc or /sys."""
    for name in ("stat", "lstat", "listdir", "scandir"):
        real = getattr(os, name)

        def hidden(path=".", *args, _real=real, **kwargs):
            if _is_hidden(path):
                raise FileNotFoundError(2, "No such file or directory (simulated)", str(path))
            return _real(path, *args, **kwargs)
        setattr(os, name, hidden)


def _refuse_libc(real_cdll, names):
    class CDLL(real_cdll):
        def __init__(self, name, *args, **kwargs):
            if name in names:
                raise OSError(f"{name}: cannot open shared object file (simulated: no such library here)")
            super().__init__(name, *args, **kwargs)
    return CDLL


def _only_spawn():
    def get_all_start_methods():
        return ["spawn"]
    context = multiprocessing.get_context("spawn")
    multiprocessing.get_all_start_methods = get_all_start_methods
    real_get_context = multiprocessing.get_context

    def get_context(method=None):
        if method not in (None, "spawn"):
            raise ValueError(f"cannot find context for {method!r}")
        return context if method is None else real_get_context(method)
    multiprocessing.get_context = get_context
    multiprocessing.set_start_method("spawn", force=True)


def _msvcrt_module(fcntl):
    """msvcrt's locking(), as Windows keeps it: one holder per open file; LK_NBLCK refused at once when held."""
    module = type(sys)("msvcrt")
    module.LK_UNLCK, module.LK_LOCK, module.LK_NBLCK, module.LK_RLCK, module.LK_NBRLCK = 0, 1, 2, 3, 4

    def locking(fd, mode, nbytes):
        if mode == module.LK_UNLCK:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if mode in (module.LK_NBLCK, module.LK_NBRLCK) else 0))
        except OSError:
            raise PermissionError(13, "Permission denied") from None  # what Windows' _locking sets
    module.locking = locking
    return module


def _answer_the_toolkit(name):
    """platform.system() says `name` to the toolkit's modules and the truth to everyone else: torch and the standard
    library pick their Linux builds' files by it."""
    real = platform.system

    def system():
        return name if sys._getframe(1).f_globals.get("__name__", "").startswith("gpt_toolkit") else real()
    platform.system = system


def _windows():
    import fcntl
    import getpass  # noqa: F401  these two tell Windows by msvcrt's presence: they keep their Linux selves
    import subprocess  # noqa: F401
    _answer_the_toolkit("Windows")
    sys.modules["msvcrt"] = _msvcrt_module(fcntl)
    for name in ("fcntl", "resource"):
        sys.modules[name] = None  # import fails, as there
    for name in ("O_NOFOLLOW", "O_NONBLOCK", "getloadavg", "sched_getaffinity", "sysconf", "fork"):
        if hasattr(os, name):
            delattr(os, name)
    if hasattr(signal, "pthread_sigmask"):
        del signal.pthread_sigmask
    signal.SIGBREAK = 21  # Windows' number; here it is SIGTTIN, which nothing else sends
    os.O_BINARY = 0o100000  # Windows' flag for an untranslated os.open; here O_LARGEFILE, which changes nothing
    real_kill = os.kill

    def kill(pid, sig):
        if sig == 0:  # there, signal 0 is CTRL_C_EVENT: a Ctrl-C to the whole console, not a question
            raise RuntimeError("simulated Windows: os.kill(pid, 0) would send Ctrl-C to the console there")
        real_kill(pid, sig)
    os.kill = kill
    _only_spawn()
    ctypes.CDLL = _refuse_libc(ctypes.CDLL, {None, "libc.so.6", "libc.so", "libSystem.dylib"})
    builtins.open = io.open = _no_proc_open(default_encoding="gbk")
    _no_proc_paths()
    import locale
    locale.getpreferredencoding = lambda do_setlocale=True: "cp936"
    locale.getencoding = lambda: "cp936"


def _macos():
    _answer_the_toolkit("Darwin")
    if hasattr(os, "sched_getaffinity"):
        delattr(os, "sched_getaffinity")
    real = multiprocessing.get_all_start_methods
    multiprocessing.get_all_start_methods = lambda: ["spawn", *[m for m in real() if m != "spawn"]]
    multiprocessing.set_start_method("spawn", force=True)
    ctypes.CDLL = _refuse_libc(ctypes.CDLL, {"libc.so.6", "libc.so"})
    builtins.open = io.open = _no_proc_open()
    _no_proc_paths()


if SIMULATE == "windows":
    _windows()
elif SIMULATE == "macos":
    _macos()
elif SIMULATE:
    raise SystemExit(f"GPT_TOOLKIT_SIMULATE={SIMULATE!r}: use windows or macos")
