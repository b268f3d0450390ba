"""torch.compile that never stops a run. Compiling fails on machines without a working C++ compiler (or without
triton on Windows), usually at the first forward or backward rather than at torch.compile() itself; the run then
goes on in eager mode after one warning that names the cause and the fix."""
import torch

FIX = "install a C++ compiler (e.g. build-essential / Xcode command line tools), or pass --compile=False"


def compile_failure(exc):
    """The one-line cause when exc comes from torch.compile's machinery (dynamo, inductor), else None."""
    seen = exc
    while seen is not None:
        module = type(seen).__module__ or ""
        if module.startswith(("torch._dynamo", "torch._inductor")):
            first = str(seen).strip().splitlines()[0] if str(seen).strip() else type(seen).__name__
            return f"{type(seen).__name__}: {first}"[:200]
        seen = seen.__cause__ or seen.__context__
    return None


def compile_or_eager(fn, report, what, **options):
    """(torch.compile(fn, **options), True), or (fn, False) after report(warning) when torch.compile itself raises
    (an unsupported Python or platform fails here, before any call)."""
    try:
        return torch.compile(fn, **options), True
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        report(warning(f"{type(e).__name__}: {first}"[:200], what))
        return fn, False


def warning(cause, what):
    return f"warning: torch.compile failed ({cause}); {what} goes on in eager mode: {FIX}"


class CompiledOrEager:
    """fn compiled (torch.compile(fn, **options)), falling back to fn itself for good, after one report(warning), when
    compiling fails: at torch.compile() or at a call (sample.py's forward), or where the caller catches the failure
    and hands it to fallback() (a training step's backward runs the compiled graph outside any call of fn). fn must be
    safe to call again after a failed compiled call (a forward without side effects)."""

    def __init__(self, fn, report, what="generation", **options):
        self.eager, self.report, self.what = fn, report, what
        self.compiled, ok = compile_or_eager(fn, report, what, **options)
        self.failed = None if ok else "torch.compile raised"

    @property
    def current(self):
        """What to run now: the compiled fn, or fn once compiling has failed."""
        return self.eager if self.failed else self.compiled

    def fallback(self, exc):
        """If exc comes from torch.compile's machinery: report the warning, use fn from now on, and return the cause;
        else None (exc is the caller's to raise)."""
        cause = compile_failure(exc) if self.failed is None else None
        if cause is not None:
            self.failed = cause
            self.report(warning(cause, self.what))
        return cause

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                if self.fallback(e) is None:
                    raise
        return self.eager(*args, **kwargs)
