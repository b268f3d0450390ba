"""What every script does first, before it imports torch (seconds): start_script()."""
import os
import sys

from gpt_toolkit.core.errors import quiet_interrupts

# OpenMP's threads wait for the next parallel region by spinning: GNU OpenMP (torch's on Linux) for 300,000 turns
# before it sleeps. On a machine that other work shares (a training in one terminal, sample.py in another) the
# processes' spinning threads take the cores from each other's real work: a training step beside sample.py took 5-18x
# its time alone, sample.py beside a training streamed at 0.05-0.13x its speed. Too few turns cost a quiet machine
# instead: a thread that sleeps between two of a step's hundreds of short parallel regions is woken for the next, so
# at 1,000 turns the main job's step took 1.58x its time with torch's defaults and sample.py streamed at 0.44x (Xeon
# with AMX, bf16). 3,000 turns: 1.26x and 0.63x alone; beside each other a step takes under 2x its time alone and
# sampling keeps 0.72x its speed (tools/bench_busy.py, docs/performance.md).
SPIN_COUNT = "3000"
_SET_HERE = {}  # what start_script put into os.environ: the toolkit's choice, not the user's


def users_environment():
    """os.environ without what start_script set: for a tool that starts another project's program (nanoGPT's train.py
    beside ours), which must run as the user's shell would start it. Inherited, GOMP_SPINCOUNT=1000 made nanoGPT's CPU
    recipe 1.35x slower a step on a Xeon with AMX (50.5 against 37.3 ms), flattering every ratio against it."""
    return {k: v for k, v in os.environ.items() if _SET_HERE.get(k) != v}


def start_script():
    """A script's first call, before its other imports: a Ctrl-C during the imports ends it in one line
    (errors.quiet_interrupts); a console that cannot show a character (a GBK console and an emoji) shows '?' instead
    of ending the run; and OpenMP's idle threads spin only briefly before they sleep (GOMP_SPINCOUNT, read when torch
    loads OpenMP) unless GOMP_SPINCOUNT or OMP_WAIT_POLICY is set already, or GPT_TOOLKIT_OMP_DEFAULTS=1 asks for
    OpenMP's own."""
    quiet_interrupts()
    for stream in (sys.stdout, sys.stderr):  # a console in another code page (GBK on a Chinese Windows, piped to tee)
        encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("_", "-")
        if encoding not in ("utf-8", "utf8") and getattr(stream, "errors", None) == "strict" and \
                hasattr(stream, "reconfigure"):  # shows what it cannot write as '?' (stderr's backslashreplace stays)
            stream.reconfigure(errors="replace")
    brief_openmp_spin()


def brief_openmp_spin():
    """GOMP_SPINCOUNT=SPIN_COUNT for this process and the children it starts, unless the user set GOMP_SPINCOUNT or
    OMP_WAIT_POLICY, or GPT_TOOLKIT_OMP_DEFAULTS=1 asks for OpenMP's own (read when torch loads OpenMP)."""
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ) and os.environ.get("GPT_TOOLKIT_OMP_DEFAULTS") != "1":
        os.environ["GOMP_SPINCOUNT"] = _SET_HERE["GOMP_SPINCOUNT"] = SPIN_COUNT
