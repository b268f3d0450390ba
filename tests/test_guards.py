"""The loop's guards at their points, as the review of the seam found them wanting: the NaN/Inf verdict comes before
an evaluation on every process and before a step's log line; early stopping says its line once the state is saved;
a test's fault in after_backward comes before the gradient monitor looks."""
import types

import pytest
import torch
from conftest import TINY_TRAIN
from test_diagnostics import inf_gradients, run_train

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.training.guards import NonFiniteStop


def guard_of(log_interval, evaluated):
    """A started NonFiniteStop of a run whose next step is an evaluation (evaluated=False) or not."""
    printed = []
    run = types.SimpleNamespace(cfg=types.SimpleNamespace(log_interval=log_interval), log=types.SimpleNamespace(
        print=printed.append), saves=types.SimpleNamespace(kept=lambda: "nothing saved"),
        training=types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False)),
        world=types.SimpleNamespace(device="cpu"))
    guard = NonFiniteStop()
    guard.start(run, types.SimpleNamespace(evaluated=evaluated))
    return guard, printed


def test_a_non_finite_step_stops_every_process_before_the_evaluation_it_precedes():
    """Every DDP process calls after_step; rank 0 alone evaluates. Step 7 of log_interval 5 is no log step, but the
    evaluation at step 8 is owed: the verdict comes here, on every process, not in rank 0's evaluation."""
    guard, printed = guard_of(log_interval=5, evaluated=False)
    with pytest.raises(UserError, match="NaN/Inf by step 7"):
        guard.after_step(7, torch.tensor(float("nan")), None, 1e-3)
    guard, _ = guard_of(log_interval=5, evaluated=True)  # no evaluation next: the verdict waits for a log step
    guard.after_step(7, torch.tensor(float("nan")), None, 1e-3)
    with pytest.raises(UserError):
        guard.after_step(10, torch.tensor(1.0), None, 1e-3)


def test_the_verdict_comes_before_the_steps_log_line(data_dir, tmp_path, capsys):
    args = [*TINY_TRAIN, "--max_iters=40", "--log_interval=1", f"--data_dir={data_dir}"]
    code, out, err = run_train(capsys, *args, f"--out_dir={tmp_path / 'o'}", guard=inf_gradients(at_steps={23}))
    assert code == 1 and "NaN/Inf by step 23" in err
    assert "iter 22: loss" in out and "iter 23:" not in out  # no line with a NaN loss in training.log


def test_early_stopping_says_so_after_it_saved(data_dir, tmp_path, capsys):
    code, out, _ = run_train(capsys, *TINY_TRAIN, "--max_iters=60", "--eval_interval=10", "--early_stop_patience=2",
                             "--early_stop_min_delta=10", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'd'}")
    lines = out.splitlines()
    stop = next(i for i, line in enumerate(lines) if line.startswith("early stopping at step 20"))
    assert code == 0 and lines[stop - 1].startswith("saving checkpoint") and stop == len(lines) - 2, lines[-4:]
