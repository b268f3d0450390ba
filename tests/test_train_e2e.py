"""End to end: train a tiny model on shakespeare_char, read its logs as the tutorial's tools do, sample, resume, DDP."""
import dataclasses
import itertools
import json
import re

import pytest
import torch
from conftest import AUTO_DTYPE, OTHER_DTYPE, TINY_TRAIN, run_script

from gpt_toolkit.core.config import Config
from gpt_toolkit.models.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)

TUTORIAL_EVAL_RE = r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)"  # verbatim from the tutorial's parse_log


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    r = run_script("train.py", "config/train_shakespeare_char.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def parse_log(text):
    steps, train, val = [], [], []
    for line in text.splitlines():
        m = re.search(TUTORIAL_EVAL_RE, line)
        if m:
            steps.append(int(m.group(1)))
            train.append(float(m.group(2)))
            val.append(float(m.group(3)))
    return steps, train, val


def test_log_is_parsed_by_the_tutorials_regex_and_val_loss_falls(trained):
    out, stdout = trained
    steps, _, val = parse_log((out / "training.log").read_text())
    assert steps == [0, 20, 40, 60]
    assert all(a > b for a, b in zip(val, val[1:])), val
    assert val[0] > 4.0 and val[-1] < 3.4
    assert parse_log(stdout) == parse_log((out / "training.log").read_text())  # the file holds what was printed
    lines = stdout.strip().splitlines()
    assert re.fullmatch(r"training took [\d.]+ seconds", lines[-1])
    assert re.search(r"iter 10: loss [\d.]+, time [\d.]+ms, mfu [\d.]+%", stdout)


def test_metrics_config_and_checkpoint_files(trained):
    out, _ = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    trains = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert [r["iter"] for r in trains] == [0, 10, 20, 30, 40, 50]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in trains)
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] == 2 and config["resolved_device"] == "cpu" and config["dataset"] == "shakespeare_char"
    assert config["vocab_size"] == 65
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= set(ckpt)
    assert ckpt["model_args"] == dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.2)
    assert ckpt["iter_num"] == 60 and ckpt["best_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert ckpt["config"]["batch_size"] == 8


def test_the_screen_shows_the_config_that_was_set_and_the_log_keeps_every_key(trained):
    out, stdout = trained
    every = [f.name for f in dataclasses.fields(Config)]
    lines = stdout.splitlines()
    assert lines[0] == (f"config (set by config/train_shakespeare_char.py and --key=value, or not the default; all "
                        f"{len(every)} keys are in {out / 'training.log'}):")
    shown = [line.split("=")[0].strip() for line in itertools.takewhile(lambda x: x.startswith("  "), lines[1:])]
    file_keys = ["out_dir", "eval_interval", "log_interval", "eval_iters", "always_save_checkpoint", "wandb_log",
                 "wandb_project", "wandb_run_name", "dataset", "gradient_accumulation_steps", "batch_size", "block_size",
                 "n_layer", "n_head", "n_embd", "dropout", "learning_rate", "max_iters", "beta2", "warmup_iters",
                 "lr_decay_iters", "min_lr"]  # wandb_log = False is the default, but the file says so: it shows
    assert shown == [k for k in every if k in file_keys or k in ("data_dir", "device")] and len(shown) == 24
    log = (out / "training.log").read_text().splitlines()
    assert log[0] == "config:" and [line.split("=")[0].strip() for line in log[1:1 + len(every)]] == every
    assert not log[1 + len(every)].startswith("  ") and "  seed" in "\n".join(log) and "  seed" not in stdout
    assert list(json.loads((out / "config.json").read_text()))[:len(every)] == every


def test_sample_from_checkpoint(trained, tmp_path):
    out, _ = trained
    args = ["sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=3", "--max_new_tokens=60",
            "--temperature=0.8", "--top_k=200", "--seed=1"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split("---------------\n")
    assert len(samples) == 4 and samples[-1] == ""
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 60 + 1 for s in samples[:3])
    assert run_script(*args).stdout == r.stdout  # same seed, same text
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\n")
    r = run_script("sample.py", f"--out_dir={out}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=10")
    assert r.returncode == 0 and r.stdout.startswith("JULIET:\n")


def test_resume_continues_from_the_checkpoint(trained, data_dir, tmp_path):
    out, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("ckpt.pt", "training.log"):
        (resumed / name).write_bytes((out / name).read_bytes())
    r = run_script("train.py", "config/train_shakespeare_char.py", *TINY_TRAIN, f"--data_dir={data_dir}",
                   f"--out_dir={resumed}", "--init_from=resume", "--max_iters=80", "--lr_decay_iters=80")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "at step 60" in r.stdout
    steps, _, _ = parse_log((resumed / "training.log").read_text())
    assert steps == [0, 20, 40, 60, 80]  # appended, and step 60 not evaluated twice
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 80


def test_nanogpt_checkpoint_loads_for_sampling_and_resume(trained, data_dir, tmp_path):
    """A checkpoint as nanoGPT writes it: compiled-model key prefix, no vocabulary inside, meta.pkl in data/."""
    out, _ = trained
    ours = load_checkpoint(out / "ckpt.pt")
    theirs = {"model": {"_orig_mod." + k: v for k, v in ours["model"].items()}, "optimizer": ours["optimizer"],
              "model_args": ours["model_args"], "iter_num": ours["iter_num"], "best_val_loss": torch.tensor(2.5),
              "config": {**ours["config"], "data_dir": str(data_dir)}}
    nano = tmp_path / "nano"
    nano.mkdir()
    save_checkpoint(theirs, nano / "ckpt.pt")
    r = run_script("sample.py", f"--out_dir={nano}", "--num_samples=1", "--max_new_tokens=20", "--start=KING:")
    assert r.returncode == 0 and r.stdout.startswith("KING:"), r.stderr
    r = run_script("train.py", "config/train_shakespeare_char.py", *TINY_TRAIN, f"--data_dir={data_dir}",
                   f"--out_dir={nano}", "--init_from=resume", "--max_iters=70", "--lr_decay_iters=70")
    assert r.returncode == 0, r.stderr
    assert "step 70:" in r.stdout


@pytest.mark.parametrize("dtype", [AUTO_DTYPE, OTHER_DTYPE])
def test_accumulation_trains_like_one_big_batch(data_dir, tmp_path, dtype):
    """16 rows in one micro-batch or 8 x 2 accumulated: the same rows (a function of seed and step) and the same
    mean gradient: in float32 the same losses at every step. In bfloat16 the two runs' matmuls have other shapes, so
    other roundings, which training amplifies until the trajectories part by an amount that depends on the CPU's bf16
    kernels (AMX's differ from AVX512-BF16's); so there the first step's loss and gradient are compared, before any
    update amplifies a rounding (the gradient monitor reads it before clipping)."""
    runs = []
    for batch, accum in ((16, 1), (8, 2)):
        out = tmp_path / f"{batch}x{accum}"
        r = run_script("train.py", *TINY_TRAIN, f"--dtype={dtype}", f"--batch_size={batch}",
                       f"--gradient_accumulation_steps={accum}", "--max_iters=20", "--dropout=0", "--log_interval=1",
                       "--grad_monitor_interval=100", f"--data_dir={data_dir}", f"--out_dir={out}")
        assert r.returncode == 0, r.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append(([rec["loss"] for rec in records if rec["type"] == "train"],
                     next(rec for rec in records if rec["type"] == "grad" and rec["iter"] == 0)))
    (losses, grad), (accumulated, accumulated_grad) = runs
    assert len(losses) == 20
    # step 0: the same rows through the same weights; an undivided loss would double the gradient
    rel = 1e-5 if dtype == "float32" else 1e-2
    assert accumulated[0] == pytest.approx(losses[0], rel=rel)
    assert accumulated_grad["grad_norm"] == pytest.approx(grad["grad_norm"], rel=rel)
    assert accumulated_grad["layer_norms"] == pytest.approx(grad["layer_norms"], rel=rel)
    if dtype == "float32":
        assert accumulated == pytest.approx(losses, abs=1e-4)  # every step
    assert losses[-1] < losses[0] - 0.3 and accumulated[-1] < accumulated[0] - 0.3  # and both trained
