"""User-facing errors: bad input becomes one line on stderr and a non-zero exit, never a traceback."""
import contextlib
import gc
import importlib
import os
import re
import signal
import sys
import threading
import time

from gpt_toolkit.core import system


class UserError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""

    exit_code = 1


class Aborted(UserError):
    """A second Ctrl-C or SIGTERM cut short what a run did after the first (its save): exit 128 + that signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


class ConfigError(UserError):
    """Bad command line or config file (exit 2, like argparse)."""

    exit_code = 2


class FollowerError(UserError):
    """A torchrun process stops for an error that another process says (rank 0, which writes the run's files): this
    one says it only if torchrun has not stopped it by then."""


def short(text, limit=200):
    """A library message cut at a word, not mid-word."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def first_line(exc):
    """An exception's first message line (library errors run to many lines), or its type when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def import_optional(module, needed_for, *, package=None, install=None):
    """Import a package the core does not need, or say which setting needs it and how to install it (by default
    "the <module> package" and "pip install <module>")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{needed_for} needs {package or f'the {module} package'}: "
                        f"{install or f'pip install {module}'}") from None


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM while a run is already stopping after the first (stopping.StopRequest)."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where a Ctrl-C raises KeyboardInterrupt: a script stops the same way for both, in one line,
    and exits 128 + the signal (143)."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def forking_children():
    """Around forking child processes that the parent ends with SIGTERM (a pool, a trainer in Rust). Ctrl-C and SIGTERM
    are blocked in this thread meanwhile, so each child starts with them blocked and pending until its first call,
    child_signals(), makes SIGTERM fatal: the script's handler that a child inherits raises in Python, which a child
    inside Rust or C never runs, and one that replaced it just after the signal came swallowed it (a pool ended at once
    waited for ever). In this process a signal that another thread takes meanwhile is only recorded (raised inside a
    fork hook it would be swallowed: a Ctrl-C lost), and raised again once the children exist."""
    if threading.current_thread() is not threading.main_thread() or not system.can_block_signals():
        yield  # Windows: no fork, and children start fresh
        return
    held, caught = system.stop_signals(), []
    system.block_signals(held)
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        system.unblock_signals(held)  # one that waited for this thread reaches its handler now
        for signum in caught[:1]:
            signal.raise_signal(signum)


def child_signals():
    """A child's first call (see forking_children): Ctrl-C ignored (the parent takes it and ends the children), SIGTERM
    fatal, then both unblocked (a SIGTERM that came since the fork ends the child now)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    system.unblock_signals(set(system.stop_signals()))


INTERRUPTED = "interrupted: stopped before finishing; no file was left half-written"


def _exit_at_once(signum, frame):
    os.write(sys.stderr.fileno(), f"{INTERRUPTED}\n".encode())
    os._exit(128 + signum)


def _under_torchrun():
    """A torchrun worker: torchrun itself ends the workers with SIGTERM when one fails, and says so; they go quietly."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def quiet_interrupts():
    """Make a Ctrl-C or SIGTERM that arrives while a script is still importing (torch takes seconds) end it in one
    line instead of a traceback (or, for SIGTERM, no word at all). Scripts call this before their other imports. Until
    run_main starts the script's main, either signal exits at once: nothing is written yet, and a KeyboardInterrupt
    raised inside a library's import can be swallowed by it or leave a module half-imported that fails later with a
    traceback. Also sets sys.excepthook to print a KeyboardInterrupt that escapes otherwise in one line."""
    if threading.current_thread() is threading.main_thread():
        for sig in system.stop_signals() if not _under_torchrun() else (signal.SIGINT,):
            signal.signal(sig, _exit_at_once)
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(INTERRUPTED, file=sys.stderr, flush=True)
        else:
            previous(kind, value, tb)
    sys.excepthook = hook


OTHER_RANKS_WAIT_S = 30
# what gloo says in a collective whose other process has exited (its own error says why)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_gone(exc):
    """gloo's words for a collective whose other process exited, under torchrun, or None."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    while exc is not None:
        text = str(exc)
        if "gloo" in text:
            for words in PEER_GONE:
                if words in text:
                    return words
        exc = exc.__context__
    return None


MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"


def missing_mps_op(exc):
    """A one-line advice for torch's error on an operation MPS does not implement, or None for another error."""
    text = str(exc)
    if not isinstance(exc, NotImplementedError) or "MPS" not in text:
        return None
    op = re.search(r"operator '([^']+)'", text)
    return (f"{op.group(1) if op else 'an operation'} is not implemented on MPS: set {MPS_FALLBACK}=1 to run it "
            f"on the CPU (slower), or use --device=cpu")


def run_main(main, argv=None):
    """Run an entry point; turn UserError into 'error: ...' and its exit code, and a Ctrl-C or SIGTERM into one line
    (exit 130 or 143). With argv None (a script's own command line) the process ends here, promptly: gc.freeze first
    keeps the interpreter's last garbage collections from walking every object torch made (about a second, longer
    on a busy machine: a Ctrl-C would take that long to end a tool), and a signal that arrives during those last
    steps is ignored instead of ending a finished tool with no word."""
    if signal.getsignal(signal.SIGINT) is _exit_at_once:  # the imports are done: a Ctrl-C is a KeyboardInterrupt again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in system.stop_signals()[1:]:  # and a SIGTERM (or Windows' Ctrl-Break) one too (Terminated)
        if signal.getsignal(sig) is _exit_at_once:
            signal.signal(sig, _raise_terminated)

    def end(code):
        if argv is None:
            gc.freeze()
            for sig in () if _under_torchrun() else system.stop_signals():  # the work is over: a signal
                signal.signal(sig, signal.SIG_IGN)  # now would only kill the exit (Python's last steps reset handlers)
        sys.exit(code)
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if isinstance(e, FollowerError) or isinstance(e, ConfigError) and int(os.environ.get("LOCAL_RANK", 0)) > 0:
            # The settings' error: every torchrun process finds it, and the first on a node says it. The others wait:
            # one that exited first would have torchrun stop the first before its line. torchrun stops them once it
            # has exited; one still here after the wait found an error of its own, and says it. Likewise for an
            # error that rank 0 says.
            time.sleep(OTHER_RANKS_WAIT_S)
        print(f"error: {e}", file=sys.stderr, flush=True)
        end(e.exit_code)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing is wrong, and nothing to say
        system.silence_stream(sys.stdout)  # Python's advice: point stdout at devnull before exiting
        end(1)
    except BaseException as e:
        interrupt = interrupt_behind(e)
        gone = peer_gone(e) if interrupt is None else None
        if gone:  # the other's error is the one to read: torchrun stops this one first
            time.sleep(OTHER_RANKS_WAIT_S)
            print(f"error: another process of this torchrun job failed (its error is above), so this one stopped too "
                  f"(gloo: {gone})", file=sys.stderr, flush=True)
            end(1)
        advice = missing_mps_op(e) if interrupt is None else None
        if advice:
            print(f"error: {advice}", file=sys.stderr, flush=True)
            end(1)
        if interrupt is None:
            raise
        second = isinstance(interrupt, SecondInterrupt)
        print("aborted by a second interrupt: nothing more was saved" if second else INTERRUPTED, file=sys.stderr,
              flush=True)
        end(128 + getattr(interrupt, "signum", signal.SIGINT))
    end(code or 0)


def interrupt_behind(exc):
    """The KeyboardInterrupt behind exc, also one that a library turned into another error while it unwound
    (torch.save raises RuntimeError when interrupted mid-write), or None."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc = exc.__context__
    return None
