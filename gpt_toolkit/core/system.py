"""The operating system, in one place. Every call that differs between Linux, macOS and Windows goes through here,
each with its fallback: locks, opens that never follow a link, child processes, signals, memory and CPU facts, and
the C allocator's tuning. Nothing else in the toolkit imports fcntl, msvcrt, resource or ctypes, reads /proc or /sys,
or asks which platform it runs on (tests/test_structure.py checks it; tests/test_platforms.py runs the main job in
a Python made to lack what Windows and macOS lack). Where a fact cannot be known here, the answer is None and the
caller says so; nothing here raises for a missing feature."""
import errno
import os
import platform
import signal

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # everywhere but Windows
    msvcrt = None
try:
    import resource
except ImportError:  # Windows
    resource = None
# ctypes and multiprocessing are imported where they are used: errors.py imports this module before a script has
# made Ctrl-C quiet, and that window stays short


def kind():
    """'linux', 'macos', 'windows', or platform.system() in lower case elsewhere."""
    name = platform.system()
    return {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}.get(name, name.lower())


def is_windows():
    return kind() == "windows"


# ---- locks and opens ----

# Windows' byte-range locks are mandatory: a locked byte cannot even be read by another process. The lock is on a
# byte far past the holder's record (which a refused run reads to say who holds it); a lock may lie past the end.
LOCK_OFFSET = 1 << 30


def lock(f):
    """Take an exclusive, non-blocking lock on the open file f; OSError when another process holds it. flock where
    there is fcntl (the lock dies with its process, even on SIGKILL), msvcrt's byte-range lock on Windows."""
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        _lock_byte(f, msvcrt.LK_NBLCK)


def unlock(f):
    """Give back lock(f)'s lock before f is closed: Windows frees the locks of a closed file only some time later,
    so a process that looked (DirectoryLock.check_free) and then locks at once would find its own lock in the way."""
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    else:
        _lock_byte(f, msvcrt.LK_UNLCK)


def _lock_byte(f, mode):
    f.seek(LOCK_OFFSET)
    try:
        msvcrt.locking(f.fileno(), mode, 1)
    finally:
        f.seek(0)


def lock_holder(f):
    """The id of the process holding a flock on the open file f, from /proc/locks (Linux), or None where that cannot
    be told. Lines read 'N: FLOCK  ADVISORY  WRITE PID MAJOR:MINOR:INODE 0 EOF'; a waiter's line has '->'."""
    try:
        st = os.fstat(f.fileno())
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    exact, same_inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}", f":{st.st_ino}"
    found = [(parts[5], int(parts[4])) for parts in map(str.split, lines)
             if len(parts) >= 6 and parts[1] == "FLOCK" and "->" not in parts and parts[4].isdigit()]
    for device in (exact, same_inode):  # an overlay file system reports another device than fstat
        pids = {pid for where, pid in found if where == device or (device == same_inode and where.endswith(device))}
        if len(pids) == 1 and 0 not in pids:
            return pids.pop()
    return None


def command_line(pid):
    """A process's command line (Linux's /proc), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", errors="replace").strip()[:200]
    except OSError:
        return None


def process_alive(pid):
    """Whether a process with this id runs (on this machine). Where that cannot be told, it counts as alive."""
    if pid == os.getpid():
        return True
    if is_windows():  # os.kill(pid, 0) would send it a Ctrl-C there: ask Win32 instead
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours to signal
        return True
    return True


def _windows_process_alive(pid):
    """Win32's answer: a process that can be opened and has not exited, or one we may not open (it exists)."""
    import ctypes
    still_active, query, access_denied = 259, 0x1000, 5  # STILL_ACTIVE, PROCESS_QUERY_LIMITED_INFORMATION
    try:
        kernel32 = ctypes.windll.kernel32
    except AttributeError:  # no Win32 here (the suite's simulation): cannot tell, so alive
        return True
    handle = kernel32.OpenProcess(query, False, pid)
    if not handle:
        return kernel32.GetLastError() == access_denied  # else ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def no_follow_flags():
    """(flags for os.open that refuse a symbolic link and do not wait on a FIFO, whether the second is among them),
    with O_BINARY on Windows (else os.open's file is in text mode there: each \n written becomes \r\n). Windows has
    neither of the first two: its callers look at the path first."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    return getattr(os, "O_NOFOLLOW", 0) | nonblock | getattr(os, "O_BINARY", 0), bool(nonblock)


def mapped_files_block_replace():
    """True on Windows, where a file that a process has mapped (or holds open) cannot be replaced by a rename: a
    reader there reads checkpoints whole instead of mapping them, so that training can save over them."""
    return is_windows()


# ---- child processes ----

def forks():
    """Whether the toolkit's child processes start by fork: on Linux (workers inherit a loaded tokenizer, and a
    child in Rust code dies at its SIGTERM). macOS (where forking a process that has loaded system frameworks is
    unsafe, so Python spawns by default) and Windows spawn: a child imports its module afresh, so worker functions
    must be importable and their arguments picklable."""
    import multiprocessing
    return kind() == "linux" and "fork" in multiprocessing.get_all_start_methods()


def child_context():
    """The multiprocessing context for the toolkit's workers: fork where forks() says so, else spawn."""
    import multiprocessing
    return multiprocessing.get_context("fork" if forks() else "spawn")


def die_with_parent():
    """In a child process: have the kernel end it when its parent dies (Linux's PR_SET_PDEATHSIG), so a parent that
    is killed leaves no worker behind. Returns whether that took; elsewhere the child checks its parent's id."""
    if kind() != "linux":
        return False
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL) == 0
    except (OSError, AttributeError):  # another C library
        return False


def utf8_pipes(env=None):
    """subprocess keywords for text pipes to a child Python process: it writes UTF-8 (PYTHONIOENCODING) and this one
    reads UTF-8, not the code page (GBK on a Chinese Windows, where parent and child disagree once either is told
    otherwise); a byte that is not UTF-8 reads as U+FFFD instead of ending the tool."""
    return {"text": True, "encoding": "utf-8", "errors": "replace",
            "env": {**(os.environ if env is None else env), "PYTHONIOENCODING": "utf-8"}}


def reader_gone(error):
    """Whether a write's error means its pipe has no reader any more (EPIPE; EINVAL on a Windows pipe)."""
    return isinstance(error, BrokenPipeError) or (is_windows() and getattr(error, "errno", None) == errno.EINVAL)


def silence_stream(stream):
    """Point a standard stream's file descriptor at the null device once its reader has gone (a closed pipe: `| tee`
    ended by the same Ctrl-C, `| head`), and the other standard stream's too when it is the same pipe (`2>&1`), so
    that later writes, and Python's last flush, go nowhere without an error."""
    import sys
    try:
        fd = stream.fileno()
        pipe = os.fstat(fd)
    except (OSError, ValueError, AttributeError):  # not a file (captured), or closed: its writes fail on their own
        return
    fds = [fd]
    for other in (sys.stdout, sys.stderr):
        try:
            if other.fileno() != fd and os.path.samestat(os.fstat(other.fileno()), pipe):
                fds.append(other.fileno())
        except (OSError, ValueError, AttributeError):
            pass
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for each in fds:
            os.dup2(null, each)
    finally:
        os.close(null)


# ---- signals ----

def stop_signals():
    """The signals that ask a run to stop: Ctrl-C (SIGINT), SIGTERM, and on Windows the console's Ctrl-Break."""
    extra = (signal.SIGBREAK,) if is_windows() and hasattr(signal, "SIGBREAK") else ()
    return (signal.SIGINT, signal.SIGTERM, *extra)


def signal_name(sig):
    """'SIGINT', 'SIGTERM', 'SIGBREAK' (Windows' number is another signal's on Linux)."""
    return "SIGBREAK" if sig == getattr(signal, "SIGBREAK", None) else signal.Signals(sig).name


def can_block_signals():
    """Whether this thread's signals can be held back (POSIX's pthread_sigmask; not on Windows)."""
    return hasattr(signal, "pthread_sigmask")


def block_signals(signals):
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)


def unblock_signals(signals):
    if can_block_signals():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


# ---- memory and CPU facts ----

def available_memory():
    """(bytes the system can still give, what that figure is), or (None, why not). Linux: MemAvailable, or the
    container's limit when lower; macOS: free plus inactive pages (its unified memory is also the GPU's);
    Windows: the available physical memory."""
    k = kind()
    if k == "linux":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None, "no /proc/meminfo"
        cgroup = _cgroup_free()
        if cgroup is not None and cgroup < free:
            return cgroup, "memory left under this container's limit"
        return free, "available RAM"
    if k == "macos":
        return _macos_available()
    if k == "windows":
        return _windows_available()
    return None, f"free memory is not known on {platform.system()}"


def _cgroup_free():
    """Memory left under this process's cgroup (v2) limit, or None where there is no limit."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            return int(limit) - int(f.read())
    except (OSError, ValueError):
        return None


def _macos_available():
    import subprocess
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, encoding="utf-8", timeout=5).stdout
        page = int(out.split("page size of ")[1].split()[0])
        pages = {k.strip(): int(v.strip().rstrip(".")) for k, v in (line.split(":", 1) for line in out.splitlines()[1:]
                                                                     if ":" in line)}
        return page * (pages["Pages free"] + pages.get("Pages inactive", 0)), "free and inactive RAM (unified)"
    except (OSError, subprocess.SubprocessError, IndexError, KeyError, ValueError):
        return None, "vm_stat could not be read"


def _windows_available():
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
    try:
        status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return status.ullAvailPhys, "available RAM"
    except (AttributeError, OSError):
        pass
    return None, "GlobalMemoryStatusEx could not be called"


def resident_bytes():
    """This process's resident memory now (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def reset_peak_resident():
    """Start a new resident-memory high-water mark (Linux's /proc/self/clear_refs); whether that could be done."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident():
    """This process's resident high-water mark in bytes: Linux's VmHWM (since reset_peak_resident), else the
    lifetime peak from getrusage (kilobytes on Linux, bytes on macOS), or None on Windows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if kind() == "macos" else 1024)


def minor_page_faults():
    """This process's minor page faults so far (getrusage), or None on Windows."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


def tree_resident_bytes(pid):
    """Resident memory of a process and all its descendants in bytes (Linux's /proc; 0 once it has ended), or None
    where that cannot be read."""
    if kind() != "linux":
        return None
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def usable_cores():
    """The cores this process may run on (its affinity where the system has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average():
    """The last minute's load average, or None where there is none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_info():
    """{'model name', 'cpu family', 'model', 'cpu MHz', ...} of the first core from Linux's /proc/cpuinfo; {} elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


# ---- memory mappings and the allocator ----

MADV_DONTNEED = 4  # Linux's <sys/mman.h>
PAGE = 4096


def mapped_ranges(path):
    """[(start, end)] of this process's memory mappings of the file at `path` (Linux's /proc/self/maps; [] where
    there is none, or elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
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


def drop_pages(first, length):
    """madvise(MADV_DONTNEED) on whole pages of a file's clean mapping (Linux): they are read again from the file if
    touched. Returns whether it was done."""
    if kind() != "linux":
        return False
    import ctypes
    try:
        return ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), MADV_DONTNEED) == 0
    except (OSError, AttributeError, TypeError):
        return False


def keep_freed_memory():
    """Make glibc's malloc keep the memory a training step frees for the next one: blocks up to 1 GB come from its
    heap instead of fresh mmaps, and the heap is not given back to the system until 2 GB of it are free. With
    glibc's defaults every CPU step page-faults much of its activation memory back in (docs/performance.md); the
    peak stays within a few percent. Linux with glibc only: returns whether the setting took."""
    if kind() != "linux":
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # the trim threshold only if the mmap one took: alone it made steps slower (each big block freshly mapped)
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))

