"""Optional loggers (TensorBoard, W&B) and the Optuna sweep."""
import json
import signal
import subprocess
import sys

import pytest
from conftest import TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.errors import ConfigError
from gpt_toolkit.training.runlog import RunLog, WandbTracker

EVAL = {"type": "eval", "step": 20, "train_loss": 2.5, "val_loss": 2.6, "lr": 1e-3, "elapsed_s": 1.0}
TRAIN = {"type": "train", "iter": 10, "loss": 2.7, "lr": 1e-3, "time_ms": 5.0, "mfu": 0.25, "tokens_per_s": 100.0}


def test_tensorboard_events_in_out_dir(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}",
                   "--tensorboard_log=True")
    assert r.returncode == 0, r.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    assert {"eval/val_loss", "eval/train_loss", "train/loss", "train/mfu"} <= set(events.Tags()["scalars"])
    vals = [(e.step, round(e.value, 4)) for e in events.Scalars("eval/val_loss")]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert vals == [(r["step"], round(r["val_loss"], 4)) for r in logged if r["type"] == "eval"]


class FakeWandb:
    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))

    def log(self, d):
        self.calls.append(("log", d))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_tracker_uses_nanogpt_names(tmp_path):
    fake = FakeWandb()
    log = RunLog(tmp_path, trackers=[WandbTracker(fake, "proj", "run1", {"batch_size": 4})])
    log.metrics(EVAL)
    log.metrics(TRAIN)
    log.close()
    assert fake.calls == [("init", {"project": "proj", "name": "run1", "config": {"batch_size": 4}}),
                          ("log", {"iter": 20, "train/loss": 2.5, "val/loss": 2.6, "lr": 1e-3}),
                          ("log", {"iter": 10, "train/iter_loss": 2.7, "mfu": 25.0}),
                          ("finish",)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_missing_tensorboard_is_a_clear_error(data_dir, tmp_path):
    # a fake 'tensorboard' that fails to import stands in for a machine without it
    fake = tmp_path / "site"
    (fake / "tensorboard").mkdir(parents=True)
    (fake / "tensorboard" / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    r = run_script("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}",
                   "--tensorboard_log=True", env={"PYTHONPATH": str(fake)})
    assert_one_line_error(r, "tensorboard_log=True needs the tensorboard package: pip install tensorboard")
    assert not (tmp_path / "o").exists()


def test_search_space_parsing():
    from tools.sweep import parse_search
    assert parse_search("learning_rate=log:1e-4:1e-2") == ("learning_rate", "log", (1e-4, 1e-2))
    assert parse_search("dropout=0:0.3") == ("dropout", "float", (0.0, 0.3))
    assert parse_search("n_layer=int:2:6") == ("n_layer", "int", (2, 6))
    assert parse_search("bias=choice:True,False") == ("bias", "choice", [True, False])
    with pytest.raises(ConfigError, match="expected KEY=RANGE with a train.py key"):
        parse_search("lerning_rate=0:1")
    with pytest.raises(ConfigError, match="need LOW < HIGH"):
        parse_search("dropout=0.3:0.1")
    with pytest.raises(ConfigError, match="batch_size must be an int"):
        parse_search("batch_size=choice:8,big")


def test_pruned_trial_stops_its_training_process(tmp_path, monkeypatch):
    """The pruned trial's process is ended by the sweep (SIGTERM), not waited for (its 60 s would end in exit 0): the
    process's end is checked, not the time it took, so that a busy machine cannot fail it."""
    optuna = pytest.importorskip("optuna")
    from tools.sweep import run_trial
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)
    monkeypatch.setattr(subprocess, "Popen", Recorded)

    class PruneAfterFirstReport:
        number = 0

        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    metrics = tmp_path / "metrics.jsonl"
    script = (f"import json, time\nf = open({str(metrics)!r}, 'w')\n"
              "f.write(json.dumps({'type': 'eval', 'step': 0, 'train_loss': 4.0, 'val_loss': 4.1}) + '\\n'); f.flush()\n"
              "time.sleep(60)\n")
    trial = PruneAfterFirstReport()
    with pytest.raises(optuna.TrialPruned, match="val loss 4.1000 at step 0"):
        run_trial(trial, [sys.executable, "-c", script], metrics, poll_s=0.1)
    assert trial.reports == [(0, 4.1)]
    assert len(started) == 1 and started[0].returncode == -signal.SIGTERM, [p.returncode for p in started]


@pytest.mark.slow
def test_sweep_end_to_end(data_dir, tmp_path):
    pytest.importorskip("optuna")
    study = tmp_path / "study"
    r = run_script("tools/sweep.py", "config/train_shakespeare_char.py", *TINY_TRAIN, "--max_iters=20", "--eval_interval=10",
                   f"--data_dir={data_dir}", "--trials=2", "--search", "learning_rate=log:1e-3:1e-2", "--search=dropout=0:0.2",
                   f"--study_dir={study}", "--pruner=none")
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    header, rows = [c.strip() for c in table[0].split("|")[1:-1]], table[1:]
    assert header == ["trial", "state", "learning_rate", "dropout", "best val", "last step"]
    assert len(rows) == 2 and all(row.split("|")[2].strip() == "complete" for row in rows)
    best = min(float(row.split("|")[5]) for row in rows)
    assert f"val loss {best:.4f}" in r.stdout and "reproduce: python train.py" in r.stdout
    assert sorted(p.name for p in study.iterdir()) == ["trial_0", "trial_1"]


def test_sweep_needs_a_search():
    r = run_script("tools/sweep.py", "config/train_shakespeare_char.py", "--trials=2")
    assert_one_line_error(r, "nothing to search", code=2)


def test_wandb_gets_the_config_a_resume_runs_with(data_dir, tmp_path, monkeypatch):
    """The config file says 6 layers, the checkpoint has 2: the resumed run, and what W&B records of it, has 2."""
    import types
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake.init, log=fake.log, finish=fake.finish))
    out = tmp_path / "run"
    assert run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    r = run_script("train.py", "config/train_shakespeare_char.py", "--init_from=resume", "--max_iters=30",
                   "--eval_interval=10", "--eval_iters=2", "--wandb_log=True", "--device=cpu", f"--data_dir={data_dir}",
                   f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    config = fake.calls[0][1]["config"]
    assert (config["n_layer"], config["n_embd"], config["block_size"]) == (2, 32, 32)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
