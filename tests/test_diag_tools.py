"""Tools for the tutorial's challenges: lr_finder, grad_viz, estimate, debug_training."""
import dataclasses
import re

import pytest
from conftest import AUTO_DTYPE, TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.config import load_config
from gpt_toolkit.models import memory
from gpt_toolkit.models.memory import memory_estimate, parse_size
from model import GPT, GPTConfig

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_lr_finder_suggests_a_sane_rate_for_the_cpu_recipe(data_dir, tmp_path):
    png = tmp_path / "lrf.png"
    r = run_script("tools/lr_finder.py", "config/train_shakespeare_char_cpu.py", f"--data_dir={data_dir}", "--steps=100",
                   "-o", png)
    assert r.returncode == 0, r.stderr
    suggested = float(re.search(r"suggested learning_rate: ([\d.e+-]+)", r.stdout).group(1))
    lowest = float(re.search(r"at learning rate ([\d.e+-]+)", r.stdout).group(1))
    assert 1e-4 <= suggested <= 1e-2 and suggested == pytest.approx(lowest / 10, rel=1e-2)
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_grad_viz_from_monitor_records(data_dir, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=30", "--grad_monitor_interval=5", f"--data_dir={data_dir}",
                   f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "g.png"
    r = run_script("tools/grad_viz.py", f"--out_dir={out}", "--steps", "0,25", "-o", png)
    assert r.returncode == 0, r.stderr
    assert "6 gradient records, 5 layers; histograms at steps [0, 25]" in r.stdout
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 20_000
    assert_one_line_error(run_script("tools/grad_viz.py", f"--out_dir={out}", "--steps", "7"),
                          "no gradient record at step(s) [7]")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text('{"type": "eval", "step": 0, "train_loss": 4.2, "val_loss": 4.2}\n')
    assert_one_line_error(run_script("tools/grad_viz.py", f"--out_dir={plain}"), "no gradient records",
                          "--grad_monitor_interval=N")


def test_estimate_counts_exactly_and_explains_the_tutorials_formulas(data_dir):
    r = run_script("tools/estimate.py", "config/train_shakespeare_char.py", f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr
    model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False))
    exact = sum(p.numel() for p in model.parameters())
    assert f"parameters (exact, sum of p.numel()): {exact:,}" in r.stdout
    assert f"12 * L * d^2 = {12 * 6 * 384 ** 2:,} (-1.2% vs exact)" in r.stdout
    assert f"16 * L * d^2 + V * d = {16 * 6 * 384 ** 2 + 65 * 384:,} (+32.0% vs exact)" in r.stdout
    assert "tokens per iteration: 64 x 256 x 1 = 16,384; over 5,000 iterations: 81,920,000" in r.stdout


def test_estimate_memory_parts():
    """The parts, worked out by hand for the shakespeare_char model (L=6, d=384, T=256, B=64, V=65, float32)."""
    cfg, _ = load_config(["config/train_shakespeare_char.py", "--dropout=0"])
    parts = memory_estimate(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", device_type="cpu")
    assert parts["parameters"] == parts["gradients"] == 4 * 10_745_088 and parts["AdamW state"] == 8 * 10_745_088
    block = 64 * 256 * (2 * 384 * 4 + 15 * 384 * 4)  # per token: two float32 LayerNorm inputs, 15d saved tensors
    assert parts["backward working memory"] == block == 427_819_008
    assert parts["activations"] == 6 * block + 64 * 256 * (3 * 384 * 4 + 3 * 65 * 4)
    assert parts["total"] == 16 * 10_745_088 + 7 * block + 64 * 256 * 5388 + 85 * 2**20
    half = memory_estimate(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", batch_size=32, device_type="cpu")
    assert half["activations"] * 2 == parts["activations"]  # activations scale with the micro-batch
    assert "attention matrices" not in parts  # no dropout: SDPA's fused kernel keeps no T x T matrix
    cfg = dataclasses.replace(cfg, dropout=0.2)
    with_dropout = memory_estimate(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", device_type="cpu")
    assert with_dropout["attention matrices"] == 6 * 64 * 6 * 256 ** 2 * 17
    on_cuda = memory_estimate(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", device_type="cuda")
    assert "attention matrices" not in on_cuda
    bf16 = memory_estimate(cfg, n_params=10_745_088, vocab_size=65, dtype="bfloat16", device_type="cpu")
    assert bf16["autocast weight copies"] == 2 * 10_745_088 and bf16["activations"] < with_dropout["activations"]
    assert "runtime buffers" not in memory_estimate(cfg, n_params=1, vocab_size=65, dtype="float32", device_type="cuda")
    assert parse_size("8GB") == 8 * 2**30 and parse_size("512M") == 512 * 2**20


@pytest.mark.slow
def test_estimate_measured_peak_is_within_25_percent_of_the_formula(data_dir):
    # a fresh process, as a user runs it: in this one, earlier tests' freed memory would be reused and hide the peak
    r = run_script("tools/estimate.py", "config/train_shakespeare_char.py", f"--data_dir={data_dir}", "--batch_size=4",
                   "--block_size=128", "--device=cpu", "--measure=True", subprocess_only=True)
    assert r.returncode == 0, r.stderr
    off = float(re.search(r"measured on cpu: peak .* \(([+-][\d.]+)% vs the estimate\)", r.stdout).group(1))
    assert abs(off) <= 25, r.stdout
    assert re.search(r"time estimate: 5,000 x [\d.]+ ms = [\d.]+ min of training", r.stdout)


def test_estimate_budget_keeps_the_effective_batch(data_dir):
    r = run_script("tools/estimate.py", "config/train_shakespeare_char.py", f"--data_dir={data_dir}", "--device=cpu",
                   "--dtype=float32", "--gpu_mem=1GB")
    assert r.returncode == 0, r.stderr
    b, accum = map(int, re.search(r"--batch_size=(\d+) --gradient_accumulation_steps=(\d+) \(the same effective batch of 64\)",
                                  r.stdout).groups())
    assert b * accum == 64 and b < 64
    cfg, _ = load_config(["config/train_shakespeare_char.py", "--device=cpu"])
    sizes = dict(n_params=10_745_088, vocab_size=65, dtype="float32")
    assert memory_estimate(cfg, **sizes, batch_size=b)["total"] <= 2**30
    assert memory_estimate(cfg, **sizes, batch_size=2 * b)["total"] > 2**30  # the largest that fits
    small = ["--n_layer=2", "--n_embd=128", "--n_head=2", "--batch_size=1"]
    r = run_script("tools/estimate.py", "config/train_shakespeare_char.py", "--gpu_mem=100MB", f"--data_dir={data_dir}", *small)
    # recomputing the blocks fits where nothing else but a shorter context would: it is named first
    fits = re.search(r"use --activation_checkpointing=True \(each block recomputed in the backward pass, the same "
                     r"batch; about 1.3x the step time\), which the estimate puts at ([\d.]+) MB", r.stdout)
    assert fits and float(fits.group(1)) <= 100, r.stdout
    r = run_script("tools/estimate.py", "config/train_shakespeare_char.py", "--gpu_mem=93MB", f"--data_dir={data_dir}",
                   *small, "--activation_checkpointing=True", "--dropout=0")  # already on: then a shorter context
    block = int(re.search(r"even batch_size=1 does not fit at block_size=256: use --batch_size=1 --block_size=(\d+)",
                          r.stdout).group(1))
    cfg, _ = load_config(["config/train_shakespeare_char.py", *small, "--activation_checkpointing=True", "--dropout=0"])
    sizes = dict(n_params=memory.param_count(n_layer=2, n_embd=128, block_size=256, vocab_size=65, bias=False),
                 vocab_size=65, dtype=AUTO_DTYPE)  # what the estimate used: dtype=auto, this CPU's
    assert memory_estimate(cfg, **sizes, block_size=block)["total"] <= 93 * 2**20
    assert memory_estimate(cfg, **sizes, block_size=2 * block)["total"] > 93 * 2**20  # the longest that fits
    r = run_script("tools/estimate.py", "config/train_shakespeare_char.py", "--gpu_mem=60MB", f"--data_dir={data_dir}",
                   *small)  # below the CPU runtime's own buffers: no batch or context fits, and sharding would not help
    assert re.search(r"even batch_size=1 at block_size=8 needs about [\d.]+ MB, of which the weights, gradients and "
                     r"AdamW state are only [\d.]+ MB .*: use a device with more memory, or a smaller model", r.stdout), r.stdout
    assert "shard" not in r.stdout
    r = run_script("tools/estimate.py", "config/train_shakespeare_char.py", "--gpu_mem=10MB", f"--data_dir={data_dir}")
    assert "weights, gradients and AdamW state alone need 163.96 MB: shard them over several GPUs with torchrun and " \
           "--parallel=fsdp, or use a smaller model" in r.stdout, r.stdout


def test_debug_training_table():
    r = run_script("tools/debug_training.py")
    assert r.returncode == 0, r.stderr
    loss = float(re.search(r"Loss: ([\d.]+)", r.stdout).group(1))
    assert abs(loss - 4.1744) < 0.3
    rows = [line for line in r.stdout.splitlines() if line.startswith("transformer.") or line.startswith("lm_head")]
    names = [n for n, _ in GPT(GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=64, block_size=16)).named_parameters()]
    assert [row.split()[0] for row in rows] == names
    assert all(float(row.split()[3]) > 0 for row in rows)


def test_the_doctor_says_what_this_machine_picks_in_one_screen():
    r = run_script("tools/doctor.py")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["os", "system", "torch", "cpu", "threads", "auto picks", "MFU peak",
                                                      "memory", "disk", "data", "tiktoken cache", "packages", "smoke"], lines
    assert lines[1].startswith("system: linux; locks fcntl, workers fork, stop signals SIGINT/SIGTERM, text files utf-8")
    assert re.match(r"auto picks: device cpu, dtype (float32|bfloat16) \(.+\), compile False$", lines[5]), lines[5]
    assert "torch 2." in lines[11] and lines[-1].endswith(": ok") and len(lines) <= 25


@pytest.mark.slow
def test_a_tool_whose_reader_goes_away_ends_without_a_traceback():
    """`python tools/doctor.py | head -3`: the reader may be gone before the tool prints; it ends quietly."""
    import subprocess
    import sys

    from conftest import ROOT
    proc = subprocess.Popen([sys.executable, "tools/doctor.py", "--smoke=False"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
