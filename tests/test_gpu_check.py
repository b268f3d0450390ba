"""tools/gpu_check.py where there is no GPU: one line saying so; and its parts (our step, nanoGPT's step from a
checkout's model.py, the timing) on the CPU, so the GPU run only meets what is GPU-specific."""
import json
import os
import signal
import sys

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.config import load_config
from gpt_toolkit.training.timing import StepClock, train_in_process
from tools.gpu_check import measure, nanogpts, ours
from train import main as train_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: tests/test_cuda.py runs the tool")
def test_without_cuda_it_says_so_in_one_line():
    r = run_script("tools/gpu_check.py", subprocess_only=True)
    assert_one_line_error(r, "no CUDA GPU here", "a CUDA build of torch", code=1)
    assert r.stdout == ""


def test_bad_options_are_one_line_errors():
    r = run_script("tools/gpu_check.py", "--steps=x", subprocess_only=True)
    assert_one_line_error(r, "--steps", code=2)


def test_ours_times_train_py_on_synthetic_tokens(tmp_path):
    cfg, _ = load_config([*TINY_TRAIN, "--dropout=0.0"])
    handler, hook = signal.getsignal(signal.SIGINT), sys.excepthook
    ms, memory = ours(cfg, tmp_path, 65, dtype="float32", warmup=1, steps=2, compiled=False)
    assert ms > 0 and memory > 0
    assert signal.getsignal(signal.SIGINT) is handler and sys.excepthook is hook  # train.py's start-up settings undone
    assert json.loads((tmp_path / "synthetic" / "meta.json").read_text())["vocab_size"] == 65
    assert (tmp_path / "synthetic" / "train.bin").stat().st_size == 2 * 2**20


def test_nanogpts_step_trains_and_is_timed(tmp_path):
    """A nanoGPT checkout: its model.py has the API ours keeps (GPT, GPTConfig, configure_optimizers)."""
    cfg, _ = load_config([*TINY_TRAIN, "--dropout=0.0"])
    (tmp_path / "model.py").write_text((ROOT / "model.py").read_text())
    step = nanogpts(tmp_path, cfg, 65, "cpu", "float32", False)
    ms, memory = measure(step, cfg, 65, "cpu", warmup=1, steps=2)
    assert ms > 0 and memory > 0
    # the step learns: the same batch's loss falls
    X = torch.randint(0, 65, (8, 33), generator=torch.Generator().manual_seed(1))
    batches = [(X[:, :-1], X[:, 1:])]
    first = step(batches).item()
    for _ in range(10):
        last = step(batches).item()
    assert last < first - 0.1


def test_a_ctrl_c_in_a_timed_run_is_a_keyboard_interrupt(data_dir):
    class CtrlC(StepClock):
        def after_step(self, step, loss, norm, lr):
            os.kill(os.getpid(), signal.SIGINT)  # train.py's stop: it saves into its temporary out_dir, exits 130
            super().after_step(step, loss, norm, lr)
    cfg, _ = load_config([*TINY_TRAIN, f"--data_dir={data_dir}"])
    with pytest.raises(KeyboardInterrupt):
        train_in_process(train_main, cfg, steps=5, clock=CtrlC())


def test_a_directory_without_model_py_is_refused(tmp_path):
    cfg, _ = load_config(TINY_TRAIN)
    from gpt_toolkit.core.errors import UserError
    with pytest.raises(UserError, match="has no model.py"):
        nanogpts(tmp_path, cfg, 65, "cpu", "float32", False)
