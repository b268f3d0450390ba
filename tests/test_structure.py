"""The shape of the code: library modules at the root own the reusable pieces; scripts (train.py, sample.py,
data/*/prepare.py, tools/*.py) import the library and never each other; model.py can be copied alone."""
import ast
import subprocess
import sys

import pytest
from conftest import ROOT, run_script

SCRIPTS = [ROOT / "train.py", ROOT / "sample.py", *sorted((ROOT / "tools").glob("*.py")),
           *sorted((ROOT / "data").glob("*.py")), *sorted((ROOT / "data").glob("*/prepare.py"))]
SCRIPT_MODULES = {"train", "sample", "tools", "prepare", "prepare_text"} | {p.stem for p in (ROOT / "tools").glob("*.py")}
LIBRARY = sorted(p for p in ROOT.glob("*.py") if p.stem not in ("train", "sample"))


def imported_modules(path):
    """Top-level names of every module a file imports, anywhere in it (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", SCRIPTS + LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_script_is_imported(path):
    assert not imported_modules(path) & SCRIPT_MODULES, f"{path.name} imports a script"


def test_model_py_needs_only_torch():
    assert imported_modules(ROOT / "model.py") <= {"math", "dataclasses", "torch", "transformers"}


def calls_of(name):
    """Files (relative to the root) that call a function or method of this name."""
    found = set()
    for path in SCRIPTS + LIBRARY:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    found.add(str(path.relative_to(ROOT)))
    return found


def test_one_place_builds_the_optimizer_and_writes_checkpoints():
    assert calls_of("configure_optimizers") == {"trainer.py"}
    assert calls_of("set_float32_matmul_precision") == {"trainer.py"}  # TF32 wherever a run is built
    assert calls_of("build_training") == {"train.py", "tools/bench.py", "tools/estimate.py", "tools/lr_finder.py"}
    assert calls_of("save_checkpoint") == {"checkpoint.py"}
    assert calls_of("fsync") == {"files.py"}  # every file written in place goes through files.atomic_write


def test_checkpoint_names_are_spelled_in_one_place():
    for path in SCRIPTS + LIBRARY:
        if path.name == "checkpoint.py":
            continue
        strings = {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & {"ckpt.pt", "latest.pt"}, path.name


TOOLS_WITH_CONFIG = ["bench", "estimate", "lr_finder", "plot_lr", "sweep"]


@pytest.mark.parametrize("tool", sorted(p.stem for p in (ROOT / "tools").glob("*.py")))
def test_every_tool_has_help(tool):
    r = run_script(f"tools/{tool}.py", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower() and len(r.stdout.splitlines()) >= 3
    if tool in TOOLS_WITH_CONFIG:  # their own options, then the training keys of the shared configurator
        assert "this tool's options" in r.stdout and "--learning_rate=0.0006" in r.stdout


def test_scripts_freeze_their_objects_at_exit():
    """Every script runs through errors.run_main; importing errors makes the interpreter's exit skip walking the
    objects torch made (gc.freeze at exit), which saves about a second per script. (Without torch here, to be quick:
    the interpreter's own objects are frozen the same way.)"""
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"  # runs after errors' handler
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import errors\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 1_000, result.stdout
