"""torch.compile never stops a run: without a working C++ compiler (CXX pointed at nothing) training and sampling go
on in eager mode after one warning, with exactly the losses and text of --compile=False, and say what ran. (Checked
by hand too: `CXX=/nonexistent/g++ python train.py ... --compile=True` in a fresh process, the user's path.)"""
import json
import os

import pytest
import torch
from conftest import TINY_TRAIN, run_script
from test_resume import records

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)


@pytest.fixture
def no_compiler(monkeypatch):
    """What CXX=/nonexistent/g++ does, in this process: inductor's compiler setting points at nothing."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/g++"), raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_falls_back_to_eager_with_the_same_losses(data_dir, tmp_path, no_compiler):
    """(Checked by hand for sample.py in a fresh process too: CXX=/nonexistent/g++ python sample.py --compile=True
    prints one warning and the same text as without --compile.)"""
    args = ["train.py", *TINY_TRAIN, "--max_iters=20", "--eval_interval=10", "--log_interval=1", "--dropout=0.1",
            f"--data_dir={data_dir}"]
    compiled = run_script(*args, "--compile=True", f"--out_dir={tmp_path / 'c'}")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    # the run turned on deterministic algorithms (it asked to compile on a CPU); the eager run below, as a user's
    # --compile=False process, must not find them on (conftest's run_script puts them back)
    assert not torch.are_deterministic_algorithms_enabled()
    eager = run_script(*args, "--compile=False", f"--out_dir={tmp_path / 'e'}")
    assert eager.returncode == 0, eager.stderr
    warnings = [line for line in compiled.stdout.splitlines() if line.startswith("warning: torch.compile failed")]
    assert len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0] and "--compile=False" in warnings[0]
    assert "training goes on in eager mode: install a C++ compiler" in warnings[0]
    assert records(tmp_path / "c") == records(tmp_path / "e")  # every loss, dropout masks included
    info = json.loads((tmp_path / "c" / "config.json").read_text())
    assert info["resolved_compile"] is False and "InvalidCxxCompiler" in info["compile_failure"]
    events = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines() if '"compile"' in x]
    assert [(e["step"], e["compiled"]) for e in events] == [(0, False)]


def test_a_compiled_forward_falls_back_once(no_compiler):
    """sample.py's compiled forward (CompiledOrEager; that sample.py uses it is checked below): the first call's
    compile fails, the call is answered eagerly, one warning, and later calls go straight to the eager function."""
    from gpt_toolkit.training.compiling import CompiledOrEager
    calls, warnings = [], []

    def forward(x):
        calls.append(x.shape)
        return x * 2 + 1

    fn = CompiledOrEager(forward, warnings.append, dynamic=True)
    x = torch.arange(6.0)
    assert torch.equal(fn(x), x * 2 + 1) and torch.equal(fn(x[:3]), x[:3] * 2 + 1)
    assert len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0] and "generation goes on in eager mode" in warnings[0]
    assert "InvalidCxxCompiler" in fn.failed


class FakeCompiled(torch.nn.Module):
    """Stands in for torch.compile's module: records the input shape of every call it serves."""

    def __init__(self, module, shapes):
        super().__init__()
        self.module, self.shapes = module, shapes

    def forward(self, idx, *args, **kwargs):
        self.shapes.append(tuple(idx.shape))
        return self.module(idx, *args, **kwargs)


def test_only_training_steps_go_through_the_compiled_model(data_dir, tmp_path, monkeypatch):
    """Evaluation (other shapes, no grad) runs the eager module: no recompile per new shape, nothing to fail."""
    shapes, options = [], {}
    monkeypatch.setattr(torch, "compile", lambda m, **kw: options.update(kw) or FakeCompiled(m, shapes))
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=10", "--eval_interval=5", "--compile=True",
                   f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 0, r.stderr
    assert shapes == [(8, 32)] * 10  # the 10 training micro-batches; the 3 x 2 x 4 evaluation batches ran eagerly
    assert json.loads((tmp_path / "o" / "config.json").read_text())["resolved_compile"] is True
    # sample.py compiles the forward with dynamic shapes: one graph for every context length
    shapes.clear()
    r = run_script("sample.py", f"--out_dir={tmp_path / 'o'}", "--compile=True", "--num_samples=1", "--max_new_tokens=5",
                   "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert options == {"dynamic": True}


def test_compile_that_raises_at_once_falls_back_too(data_dir, tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=5", "--compile=True", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 0, r.stderr
    assert "warning: torch.compile failed (RuntimeError: Dynamo is not supported on this Python); training goes on" in r.stdout
    assert json.loads((tmp_path / "o" / "config.json").read_text())["resolved_compile"] is False


@pytest.mark.slow  # two compiled runs (a CPU compile takes ~20 s on 2 cores)
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the atomic adds' order varies only with two threads or more")
def test_compiled_cpu_training_gives_the_same_losses_every_run(data_dir, tmp_path):
    """Two runs of one seed that compile on a CPU log the same losses, as eager runs do: without torch's
    deterministic algorithms inductor adds the embedding's scattered gradients with atomic adds (their order varies
    with the threads), and the record config's runs parted at step 5 (docs/performance.md). Fresh processes: the
    setting is the process's; two threads each, as a user's run has (the suite's workers run one: one thread adds in
    one order, and the test would pass without the setting)."""
    args = ["train.py", "config/train_shakespeare_char_record.py", "--n_layer=2", "--n_embd=32", "--block_size=32",
            "--batch_size=8", "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=30", "--eval_iters=2",
            "--log_interval=1", f"--data_dir={data_dir}"]  # the record config compiles: its path, made small
    for name in ("a", "b"):
        r = run_script(*args, f"--out_dir={tmp_path / name}", env={"OMP_NUM_THREADS": "2"}, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((tmp_path / name / "config.json").read_text())["resolved_compile"] is True
    assert records(tmp_path / "a") == records(tmp_path / "b")
