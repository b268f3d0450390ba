"""torch.compile never stops a run: without a working C++ compiler (CXX pointed at nothing) training and sampling go
on in eager mode after one warning, with exactly the losses and text of --compile=False, and say what ran. (Checked
by hand too: `CXX=/nonexistent/g++ python train.py ... --compile=True` in a fresh process, the user's path.)"""
import json

import pytest
from conftest import TINY_TRAIN, run_script
from test_resume import records


@pytest.fixture
def no_compiler(monkeypatch):
    """What CXX=/nonexistent/g++ does, in this process: inductor's compiler setting points at nothing."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/g++"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_falls_back_to_eager_with_the_same_losses(data_dir, tmp_path, no_compiler):
    args = ["train.py", *TINY_TRAIN, "--max_iters=20", "--eval_interval=10", "--log_interval=1", "--dropout=0.1",
            f"--data_dir={data_dir}"]
    compiled = run_script(*args, "--compile=True", f"--out_dir={tmp_path / 'c'}")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
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
    # sampling: the same text as eager, after one warning on stderr
    sample = ["sample.py", f"--out_dir={tmp_path / 'e'}", "--num_samples=1", "--max_new_tokens=30", "--start=KING:",
              "--device=cpu"]
    s_compiled = run_script(*sample, "--compile=True")
    s_eager = run_script(*sample)
    assert s_compiled.returncode == s_eager.returncode == 0, s_compiled.stderr[-2000:]
    assert s_compiled.stdout == s_eager.stdout and s_compiled.stdout.startswith("KING:")
    assert s_compiled.stderr.count("warning: torch.compile failed") == 1
