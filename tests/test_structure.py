"""The shape of the code. The root holds the design card's four scripts; the library is the gpt_toolkit package, in
six rooms whose imports point one way (docs/architecture.md); scripts (train.py, sample.py, tools/*.py,
data/**/prepare*.py) import the library and never each other, except the tools that time or drive training, which
import train.py's entry point (main) to run its loop with their guards; the library never imports a script; model.py
can be copied alone; importing a module changes no process-wide state."""
import ast
import os
import subprocess
import sys
import tomllib

import pytest
from conftest import IN_PROCESS, ROOT, run_script

PACKAGE = ROOT / "gpt_toolkit"
ROOT_MODULES = {"model", "train", "sample", "configurator"}  # the design card's scripts; model and configurator public
LIBRARY = sorted(PACKAGE.rglob("*.py"))
# the library's rooms, lowest first: a module imports from its own room or one below it, never from one above
ROOMS = ["core", "models", "data", "training", "serving", "reports"]
SCRIPTS = [ROOT / "train.py", ROOT / "sample.py", *sorted((ROOT / "tools").glob("*.py")),
           *sorted((ROOT / "data").glob("*.py")), *sorted((ROOT / "data").glob("*/prepare.py"))]
SCRIPT_MODULES = {"train", "sample", "tools", "data", "prepare", "prepare_text", "prepare_chat"} | {
    p.stem for p in (ROOT / "tools").glob("*.py")}
ALL = SCRIPTS + LIBRARY + [ROOT / "model.py", ROOT / "configurator.py"]


def imports(path):
    """Dotted names of every module a file imports, anywhere in it (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def top_level(names):
    return {name.split(".")[0] for name in names}


def test_the_root_holds_the_design_cards_scripts_only():
    assert {p.stem for p in ROOT.glob("*.py")} == ROOT_MODULES
    assert (PACKAGE / "__init__.py").exists()
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ROOMS)
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]  # every module in a room
    for room in ROOMS:
        assert (PACKAGE / room / "__init__.py").read_text(encoding="utf-8").startswith('"""'), room  # says what it holds


def dotted(path):
    """gpt_toolkit/core/errors.py -> gpt_toolkit.core.errors (a package's __init__.py: the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_rooms(path):
    """A module of room R imports modules of R or of a room listed before it (docs/architecture.md's arrows)."""
    room = path.relative_to(PACKAGE).parts[0] if path.parent != PACKAGE else None
    for name in imports(path):
        parts = name.split(".")
        if room is None or parts[0] != "gpt_toolkit" or len(parts) < 2 or parts[1] not in ROOMS:
            continue
        assert ROOMS.index(parts[1]) <= ROOMS.index(room), f"{dotted(path)} ({room}) imports {name} ({parts[1]})"


# the tools that run a script's own main in their process: train.py's loop with their own guards (a clock, a sweep),
# and sample.py for bench_lora's reader measurement; the only arrows between scripts, each to an entry point
ENTRY_POINTS = {"bench": {"train"}, "bench_lora": {"train", "sample"}, "estimate": {"train"}, "experiment": {"train"},
                "gpu_check": {"train"}, "lr_finder": {"train"}}


@pytest.mark.parametrize("path", SCRIPTS + LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_script_is_imported(path):
    names = imports(path)
    allowed = ENTRY_POINTS.get(path.stem, set()) if path.parent.name == "tools" else set()
    for script in allowed:
        assert {n for n in names if n.split(".")[0] == script} <= {script, f"{script}.main"}, path.name
    names = {n for n in names if n.split(".")[0] not in allowed}
    assert not top_level(names) & SCRIPT_MODULES, f"{path.name} imports a script"


def test_model_py_needs_only_torch():
    assert top_level(imports(ROOT / "model.py")) <= {"math", "dataclasses", "torch", "transformers"}


def test_configurator_needs_only_the_standard_library_and_the_errors_module():
    first_party = {n for n in imports(ROOT / "configurator.py") if n.split(".")[0] in ROOT_MODULES | {"gpt_toolkit"}}
    assert first_party <= {"gpt_toolkit.core.errors", "gpt_toolkit.core.errors.ConfigError"}


def test_first_party_imports_have_no_cycle():
    """The root's public modules and the package's modules import each other without a cycle (so any of them can be
    imported first)."""
    modules = {p.stem: p for p in (ROOT / "model.py", ROOT / "configurator.py")} | {dotted(p): p for p in LIBRARY}
    graph = {name: {n for n in imports(path) if n in modules and n != name} for name, path in modules.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join([*trail, name])
        state[name] = "open"
        for dep in graph[name]:
            visit(dep, [*trail, name])
        state[name] = "done"
    for name in graph:
        visit(name, [])


def test_the_linter_knows_the_package_as_first_party():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["ruff"]["lint"]["isort"]["known-first-party"] == ["gpt_toolkit"]


def calls_of(name):
    """Files (relative to the root) that call a function or method of this name."""
    found = set()
    for path in ALL:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    found.add(str(path.relative_to(ROOT)))
    return found


def test_one_place_builds_the_optimizer_and_writes_checkpoints():
    # ours in training.py; gpu_check.py calls it on nanoGPT's own model, to time nanoGPT beside us
    assert calls_of("configure_optimizers") == {"gpt_toolkit/training/setup.py", "tools/gpu_check.py"}
    assert calls_of("set_float32_matmul_precision") == {"gpt_toolkit/core/process.py"}  # TF32: setup_process
    assert calls_of("mallopt") == {"gpt_toolkit/core/system.py"}
    assert calls_of("build_training") == {"train.py"}
    assert calls_of("save_checkpoint") == {"gpt_toolkit/models/checkpoint.py"}
    assert calls_of("fsync") == {"gpt_toolkit/core/files.py"}  # every file written in place goes through files.atomic_write


def test_one_step_sequence_the_loops():
    """The tutorial's step is written once, in train.py's loop; the tools that time or drive training run train.py
    itself (train.main with a timing.StepClock among its guards). gpu_check.py's other copy is nanoGPT's own step,
    timed beside ours."""
    # ch03 5: one backward; the doctor's is a smoke test of torch on this machine (it must run before any dataset is)
    assert calls_of("backward") == {"train.py", "tools/gpu_check.py", "tools/debug_training.py", "tools/doctor.py"}
    assert calls_of("clip_grad_norm_") == {"train.py", "tools/gpu_check.py"}
    assert not calls_of("run_path") and not calls_of("run_module")  # the library runs no script
    assert calls_of("compile_or_eager") == {"gpt_toolkit/training/compiling.py"}  # one compile wrapper: CompiledOrEager


def test_train_py_reads_as_the_tutorials_loop():
    """nanoGPT's names, in its order, and short functions: none over 100 lines, control flow at most 5 deep."""
    source = (ROOT / "train.py").read_text(encoding="utf-8")
    names = ["def get_batch(split", "def estimate_loss():", "def get_lr(it):", "while True:",
             "for param_group in optimizer.param_groups:", 'param_group["lr"] = lr', "losses = estimate_loss()",
             'micro_batches = get_batch("train", iter_num)', "for micro_step, (X, Y) in enumerate(micro_batches):",
             "model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1", "with ctx:",
             "logits, loss = model(X, Y", "loss = loss / gradient_accumulation_steps", "scaler.scale(loss).backward()",
             "scaler.unscale_(optimizer)", "torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)",
             "scaler.step(optimizer)", "scaler.update()", "optimizer.zero_grad(set_to_none=True)"]
    positions = [source.index(name) for name in names]
    assert positions == sorted(positions)
    checkpoint = source[source.index("def checkpoint("):]
    keys = [checkpoint.index(f'"{key}": ') for key in ("model", "optimizer", "model_args", "iter_num", "best_val_loss",
                                                       "config")]
    assert keys == sorted(keys)  # nanoGPT's keys, in its order, where a reader sees them
    nested = (ast.If, ast.For, ast.While, ast.With, ast.Try)

    def depth(node, level=0):
        inner = [depth(child, level + isinstance(child, nested)) for child in ast.iter_child_nodes(node)
                 if not isinstance(child, (ast.FunctionDef, ast.ClassDef))]
        return max([level, *inner])
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            assert node.end_lineno - node.lineno + 1 <= 100, node.name
            assert depth(node) <= 5, node.name


def test_every_script_makes_ctrl_c_during_its_imports_one_line():
    """Each script calls startup.start_script() before importing anything but the standard library (it makes a
    Ctrl-C during the imports one line, and sets OpenMP's wait policy before torch loads it)."""
    for path in SCRIPTS:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        seen_call = False
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and getattr(
                    node.value.func, "id", None) == "start_script":
                seen_call = True
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not seen_call:
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert all(n.split(".")[0] in sys.stdlib_module_names or n == "gpt_toolkit.core.startup" for n in names), (
                    path, names)
        assert seen_call, path


def test_scripts_that_train_or_sample_set_the_process_up():
    for script in ("train.py", "sample.py", "tools/bench.py", "tools/estimate.py", "tools/lr_finder.py"):
        assert script in calls_of("setup_process"), script


def test_checkpoint_names_are_spelled_in_one_place():
    for path in ALL:
        if path.name == "checkpoint.py":
            continue
        strings = {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & {"ckpt.pt", "latest.pt"}, path.name


@pytest.mark.parametrize("tool", [  # a tool that has no main() to run in this process starts an interpreter: slow
    t if f"tools/{t}.py" in IN_PROCESS else pytest.param(t, marks=pytest.mark.slow)
    for t in sorted(p.stem for p in (ROOT / "tools").glob("*.py"))])
def test_every_tool_has_help(tool):
    r = run_script(f"tools/{tool}.py", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower() and len(r.stdout.splitlines()) >= 3


def test_importing_any_module_changes_no_process_state():
    """In a fresh interpreter: importing every module of the package and the root's public ones leaves the garbage
    collector's freeze, the exit handlers, the exception hook, TF32, the signal handlers and matplotlib's backend as
    they were (the third-party packages are imported first: what they do on import is theirs). Scripts make their
    settings at their start (errors.quiet_interrupts, process.setup_process)."""
    modules = ["model", "configurator"] + [dotted(p) for p in LIBRARY]
    code = f"""
import atexit, gc, signal, sys, matplotlib, matplotlib.figure, numpy, tabulate, tiktoken, tqdm, torch
sys.path.insert(0, {str(ROOT)!r})
def state():
    return (gc.get_freeze_count(), atexit._ncallbacks(), sys.excepthook, torch.get_float32_matmul_precision(),
            signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), matplotlib.rcParams._get_backend_or_none(),
            "matplotlib.pyplot" in sys.modules)
before = state()
import importlib
for name in {modules!r}:
    importlib.import_module(name)
print(before == state(), before, state())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True"), result.stdout


def test_setup_process_applies_the_fast_exit_tf32_and_the_allocator():
    """The one call that changes process-wide state, made by scripts at start: the fast exit (gc.freeze at exit, so
    the interpreter's last collections skip torch's objects), TF32 on CUDA only, the CPU allocator setting on CPU
    unless asked not to, deterministic algorithms for a CPU run that compiles."""
    code = f"""
import atexit, gc, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from gpt_toolkit.core import process, system
calls = []
system.keep_freed_memory = lambda: calls.append("mallopt") or True
torch.set_float32_matmul_precision = lambda p: calls.append(p)
atexit.register(lambda: print("frozen", gc.get_freeze_count()))  # runs after setup_process's handler
handlers = atexit._ncallbacks()
print(process.setup_process("cpu", keep_cpu_memory=False), calls)
print(process.setup_process("cpu"), calls)
print(process.setup_process("cuda:0"), calls)
print("handlers added", atexit._ncallbacks() - handlers)
print(torch.are_deterministic_algorithms_enabled(), process.setup_process("cuda:0", compile=True)[-1])
print(process.setup_process("cpu", compile=True)[-1], torch.are_deterministic_algorithms_enabled(),
      torch.is_deterministic_algorithms_warn_only_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['fast exit'] []"
    assert lines[1] == "['fast exit', 'CPU allocator keeps freed memory'] ['mallopt']"
    assert lines[2] == "['fast exit', 'TF32 matmuls'] ['mallopt', 'high']"
    assert lines[3] == "handlers added 1"  # once, however often it is called
    assert lines[4] == "False TF32 matmuls"  # a GPU run that compiles keeps torch's defaults
    assert lines[5] == "deterministic algorithms True True False"  # a CPU run that compiles: inductor's determinism
    assert lines[6].startswith("frozen") and int(lines[6].split()[1]) > 10_000  # torch's objects, frozen at exit


@pytest.mark.slow
def test_scripts_run_from_any_working_directory(tmp_path):
    """Every script finds the library from another directory: --help runs (each in a fresh interpreter, together)."""
    scripts = [p for p in SCRIPTS if p.parent.name != "openwebtext"]
    procs = [subprocess.Popen([sys.executable, str(p), "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in scripts]
    for path, proc in zip(scripts, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (path, err[-2000:])
        assert "usage" in out.lower(), (path, out)


@pytest.mark.slow  # three fresh interpreters
@pytest.mark.parametrize("preset, expected", [({}, "3000"), ({"GOMP_SPINCOUNT": "50"}, "50"),
                                              ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_scripts_make_openmp_threads_spin_briefly_unless_told(preset, expected):
    """A script's first call sets GOMP_SPINCOUNT=3000 before torch loads OpenMP (the spinning threads of a training
    and a sample.py beside it take the cores from each other: tools/bench_busy.py); a user's own setting stays."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from gpt_toolkit.core.startup import start_script; "
            f"start_script(); import os, torch; print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GPT_TOOLKIT_OMP_DEFAULTS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **preset}, timeout=120)
    assert r.stdout.strip() == str(expected), r.stderr


def test_the_loop_calls_its_guards_at_named_points_only():
    """train.py reaches the guards through Guards' named points, never a guard's fields; the loop (train()) stays
    well inside the size limits: at most 90 lines, control flow at most 4 deep, and 8 guard lines."""
    tree = ast.parse((ROOT / "train.py").read_text(encoding="utf-8"))
    points = {"start", "evaluation", "evaluated", "step", "after_step", "end", "on_stop"}
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "guards"}
    assert used <= points, used - points
    loop = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    nested = (ast.If, ast.For, ast.While, ast.With, ast.Try)

    def depth(node, level=0):
        inner = [depth(child, level + isinstance(child, nested)) for child in ast.iter_child_nodes(node)
                 if not isinstance(child, (ast.FunctionDef, ast.ClassDef))]
        return max([level, *inner])
    assert loop.end_lineno - loop.lineno + 1 <= 90 and depth(loop) <= 4
    lines = ast.get_source_segment((ROOT / "train.py").read_text(encoding="utf-8"), loop).splitlines()
    assert len([line for line in lines if "guards." in line or "attempt." in line or line.strip() == "raise stop"]) <= 8


def test_init_from_is_read_in_one_module():
    """The init_from string is resolved once into a source.ModelSource: no other module compares it, or compares
    anything with "scratch" or "resume"; checkpoint.py builds no model; the config module imports no feature."""
    source = PACKAGE / "models" / "source.py"
    for path in ALL:
        if path == source:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                assert not any(isinstance(o, ast.Attribute) and o.attr == "init_from" for o in operands), path.name
                assert not any(isinstance(o, ast.Constant) and o.value in ("scratch", "resume") for o in operands), (
                    path.name, node.lineno)
    assert not {"GPT", "GPTConfig"} & {n.split(".")[-1] for n in imports(PACKAGE / "models" / "checkpoint.py")}
    first_party = {n for n in imports(PACKAGE / "core" / "config.py") if n.split(".")[0] == "gpt_toolkit"}
    assert {n.rsplit(".", 1)[0] if n.count(".") > 2 else n for n in first_party} <= {
        "gpt_toolkit.core.errors", "gpt_toolkit.core.hardware"}


def test_library_functions_take_at_most_8_parameters():
    """More than ~8 parameters means a missing object (a BatchPlan, a Schedule, Samples, a TokenizerChoice)."""
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
                count = len(names) - (names[:1] in (["self"], ["cls"]))
                assert count <= 8, f"{dotted(path)}.{node.name} takes {count}"


def test_the_tutorials_names_are_train_pys_alone():
    """get_batch, estimate_loss, get_lr and Run are defined once, in train.py, where the tutorial reads them."""
    for path in ALL:
        if path.name == "train.py":
            continue
        defined = {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & {"get_batch", "estimate_loss", "get_lr", "Run"}, path.name


SYSTEM = PACKAGE / "core" / "system.py"
PLATFORM_MODULES = {"fcntl", "msvcrt", "resource", "ctypes", "multiprocessing", "winreg", "_winapi", "termios", "pty",
                    "pwd", "grp", "posix", "nt"}
# what only some systems have, or asks which system this is (os.name, sys.platform, platform.system/mac_ver/...)
PLATFORM_ATTRIBUTES = {
    "os": {"O_NOFOLLOW", "O_NONBLOCK", "O_BINARY", "getloadavg", "sched_getaffinity", "sysconf", "fork", "kill",
           "killpg", "setsid", "getuid", "getpgid", "setpgrp", "statvfs", "uname", "nice", "register_at_fork",
           "major", "minor", "name"},
    "signal": {"pthread_sigmask", "SIGKILL", "SIGBREAK", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "alarm",
               "setitimer", "CTRL_C_EVENT", "CTRL_BREAK_EVENT"},
    "sys": {"platform", "getwindowsversion"},
    "platform": {"system", "mac_ver", "win32_ver", "libc_ver"}}
PLATFORM_KEYWORDS = {"start_new_session", "preexec_fn", "creationflags"}  # subprocess's POSIX- or Windows-only


def platform_calls(path):
    """(line, what) for each platform-specific call in a file: an import of a platform module, an attribute that only
    some systems have (however imported or aliased, or asked for by getattr/hasattr), a question about which system
    this is, a subprocess option of one system only, or a path under /proc or /sys."""
    tree, found, aliases = ast.parse(path.read_text(encoding="utf-8")), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
                if a.name.split(".")[0] in PLATFORM_MODULES:
                    found.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PLATFORM_MODULES:
                found.append((node.lineno, f"import {node.module}"))
            for a in node.names:
                if a.name in PLATFORM_ATTRIBUTES.get(node.module, ()):
                    found.append((node.lineno, f"{node.module}.{a.name}"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = aliases.get(node.value.id, node.value.id)
            if node.attr in PLATFORM_ATTRIBUTES.get(owner, ()):
                found.append((node.lineno, f"{owner}.{node.attr}"))
        elif isinstance(node, ast.Call):
            func = getattr(node.func, "id", None)
            if func in ("getattr", "hasattr") and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and \
                    isinstance(node.args[1], ast.Constant):
                owner = aliases.get(node.args[0].id, node.args[0].id)
                if node.args[1].value in PLATFORM_ATTRIBUTES.get(owner, ()):
                    found.append((node.lineno, f"{owner}.{node.args[1].value}"))
            found += [(node.lineno, f"{k.arg}=") for k in node.keywords if k.arg in PLATFORM_KEYWORDS]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings and \
                node.value.startswith(("/proc/", "/sys/", "/proc")):
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) and \
                str(node.values[0].value).startswith(("/proc", "/sys/")):
            found.append((node.lineno, repr(node.values[0].value)))
    return found


@pytest.mark.parametrize("path", [p for p in ALL if p != SYSTEM], ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_system_module_touches_the_operating_system(path):
    """Locks, no-follow opens, child processes, signal masks, memory and CPU facts, the allocator: each goes through
    gpt_toolkit/core/system.py with its fallback for Windows and macOS (issue 54), so that nothing else can forget it."""
    assert platform_calls(path) == []


def test_the_platform_check_finds_what_it_looks_for():
    """The check above, on the system module itself, finds its calls (so an empty answer elsewhere means something)."""
    found = {what for _, what in platform_calls(SYSTEM)}
    assert {"import fcntl", "import msvcrt", "import ctypes", "os.getloadavg", "'/proc/meminfo'",
            "signal.pthread_sigmask", "signal.SIGKILL", "os.kill", "os.O_NOFOLLOW", "signal.SIGBREAK"} <= found, found
    sneaky = ROOT / "tests" / "data" / "platform_calls_sample.py"  # each way around the rule, once
    assert sorted(what for _, what in platform_calls(sneaky)) == sorted([
        "import termios", "os.getloadavg", "signal.SIGKILL", "os.kill", "os.sched_getaffinity", "start_new_session=",
        "'/proc/self/status'", "platform.mac_ver"]), platform_calls(sneaky)


def text_opens_without_encoding(path):
    """(line, call) of each text-mode open, read_text, write_text, fdopen, NamedTemporaryFile or subprocess pipe
    (text=True) that does not name its encoding (ruff's PLW1514 misses calls on a path it cannot tell is one, e.g.
    (Path(d) / "x").write_text)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        text_pipe = any(k.arg in ("text", "universal_newlines") for k in node.keywords)
        if text_pipe and "encoding" not in {k.arg for k in node.keywords}:
            found.append((node.lineno, ast.unparse(node)[:80]))  # a child's pipe in the code page: system.utf8_pipes
            continue
        if name in ("read_text", "write_text") and not isinstance(node.func, ast.Attribute):
            continue  # the toolkit's own tokenizer.read_text, which reads UTF-8
        keywords = {k.arg for k in node.keywords}
        if name not in ("open", "read_text", "write_text", "fdopen", "NamedTemporaryFile", "TemporaryFile") or \
                "encoding" in keywords:
            continue
        mode_at = {"open": 1, "fdopen": 1, "NamedTemporaryFile": 0, "TemporaryFile": 0}.get(name)
        mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
        if mode is None and mode_at is not None and len(node.args) > mode_at:
            mode = node.args[mode_at]
        mode_text = mode.value if isinstance(mode, ast.Constant) else None if mode is not None else \
            ("w+b" if name in ("NamedTemporaryFile", "TemporaryFile") else "r")
        if name == "open" and isinstance(node.func, ast.Attribute) and node.func.attr == "open" and \
                getattr(node.func.value, "id", "") in ("os", "gzip", "tarfile", "zipfile", "webbrowser"):
            continue  # os.open (a descriptor), archives: bytes
        if isinstance(mode_text, str) and "b" in mode_text:
            continue
        found.append((node.lineno, ast.unparse(node)[:80]))
    return found


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_text_file_is_opened_with_its_encoding(path):
    """Text is UTF-8 everywhere (issue 54): a Chinese Windows would otherwise read and write it as GBK."""
    assert text_opens_without_encoding(path) == []
