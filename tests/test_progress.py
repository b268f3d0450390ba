"""How far a run is and when it ends: the ETA from measured step and evaluation times, in the log and metrics.jsonl,
without touching the lines the tutorial's tools parse."""
import json
import re

import pytest
from conftest import TINY_TRAIN, run_script

from gpt_toolkit.training.progress import Eta
from gpt_toolkit.training.runlog import EVAL_RE, duration, progress_line


def test_eta_from_steady_steps_and_evaluations():
    eta = Eta(max_iters=1000, eval_interval=250)
    assert eta.seconds_left(0, eval_started=0.0, now=2.0) is None  # no step timed yet
    eta.evaluation_done(0.0, 2.0)  # before the clock starts: not counted against the steps
    eta.step_done(1, 12.0)  # the first step (compilation) ends at 12 s: the clock starts here
    # 249 more steps at 0.1 s each, no evaluation between: 24.9 s
    assert eta.seconds_left(250, eval_started=36.9, now=38.9) == pytest.approx(0.1 * 750 + 2.0 * 3)
    eta.evaluation_done(36.9, 40.9)  # that evaluation and its save took 4 s
    # 250 more steps at 0.2 s each, after 4 s of evaluation
    assert eta.seconds_left(500, eval_started=40.9 + 50.0, now=92.0) == pytest.approx(
        (90.9 - 12.0 - 4.0) / 499 * 500 + 4.0 * 2)
    assert [eta.evals_after(s) for s in (0, 250, 750, 1000)] == [4, 3, 1, 0]
    assert Eta(max_iters=1100, eval_interval=250).evals_after(1000) == 1  # the last step is evaluated too


def test_the_start_of_run_estimate_waits_for_settled_steps_and_a_busy_moment_moves_it_little():
    """Two steps slowed 5x by another program (a newcomer's laptop) made the old 3-step mean read 3.7x long."""
    eta = Eta(max_iters=1000, eval_interval=250)
    now = 10.0
    eta.step_done(1, now)  # the clock starts after the first step
    for step, seconds in enumerate([0.5, 0.5] + [0.1] * 7, start=2):
        now += seconds
        eta.step_done(step, now)
        assert not eta.settled()  # 3 to 9 steps, 1.7 s at most: not yet
    now += 0.1
    eta.step_done(11, now)
    assert eta.settled() and eta.typical_step(now) == pytest.approx(0.1)
    assert eta.whole_run(11, eta.typical_step(now), per_eval=2.0) == (pytest.approx(0.1 * 989 + 2.0 * 4), 4)
    eta.step_done(12, now + 0.1)
    assert len(eta.steps) == 10  # ten are all it keeps
    early = Eta(max_iters=100, eval_interval=2)
    for step, at in ((1, 0.0), (2, 0.1)):
        early.step_done(step, at)
    early.evaluation_done(0.1, 30.1)  # an evaluation between two steps is not a step's time
    for step, at in ((3, 30.2), (4, 30.3)):
        early.step_done(step, at)
    assert early.steps == pytest.approx([0.1, 0.1])
    for step in range(5, 12):  # evaluations between every two steps (eval_interval=1): counted steps settle it
        early.evaluation_done(30.0 + step, 30.0 + step)
        early.step_done(step, 30.0 + step + 0.1)
    assert early.settled()
    queued = Eta(max_iters=100, eval_interval=50, synchronous=False)  # a GPU: the mean since the clock started
    for step, at in ((1, 0.0), (2, 0.01), (3, 0.02), (4, 3.0)):  # two steps queued, then a log step's wait
        queued.step_done(step, at)
    assert queued.typical_step(3.0) == pytest.approx(1.0)
    slow = Eta(max_iters=100, eval_interval=50)
    for step, at in enumerate([0.0, 2.0, 4.0, 6.0], start=1):  # 2 s steps: three of them are enough
        slow.step_done(step, at)
    assert slow.settled() and slow.typical_step(6.0) == pytest.approx(2.0)


def test_progress_line_format_is_invisible_to_the_tutorial_regexes():
    line = progress_line(500, 2000, 75.4, 3725, now=0)
    assert re.fullmatch(r"progress: 500/2000 steps \(25%\), 1m15s elapsed, about 1h02m left \(ends ~\d\d:\d\d\)", line)
    assert progress_line(1, 3, 5, None) == "progress: 1/3 steps (33%), 5s elapsed"
    assert [duration(s) for s in (0.4, 59.6, 61, 3599, 7322)] == ["0s", "1m00s", "1m01s", "59m59s", "2h02m"]
    for pattern in (EVAL_RE, re.compile(r"train loss ([\d.]+), val loss ([\d.]+)"), re.compile(r"training took")):
        assert not pattern.search(line)


def test_a_run_logs_progress_at_each_middle_evaluation(data_dir, tmp_path):
    out = tmp_path / "out"
    r = run_script("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    progress = [line for line in lines if line.startswith("progress: ")]
    assert [line.split(" steps")[0] for line in progress] == ["progress: 20/60", "progress: 40/60"]
    assert all(" left (ends ~" in line for line in progress)
    assert [int(EVAL_RE.search(line).group(1)) for line in lines if EVAL_RE.search(line)] == [0, 20, 40, 60]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["progress"] for e in evals] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert evals[0]["eta_s"] is None and evals[-1]["eta_s"] == 0.0 and evals[1]["eta_s"] > 0 and evals[2]["eta_s"] > 0
