"""README.zh-CN.md's commands, top to bottom, as tests/test_readme.py runs README.md's (its machinery: a fresh copy
of the toolkit, a few steps where a command trains): a reader of the Chinese tutorial's first hour (install, offline
setup, the CPU-sized configs, then the tutorial's ch04 commands in the order the guide gives them) meets no command
that needs what only a later one makes, and no GPU-sized run among the ones to type on a CPU."""

import pytest
from conftest import ROOT
from test_readme import failed, fresh_clone, readme_commands, run_in_order, skipped

ZH = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
# What tutorial ch01 7.1 adds to the GPU-sized config for a CPU (train.py's note on a CPU names the same)
CPU_SIZED = "--batch_size=16 --block_size=64 --n_layer=2 --n_head=2 --n_embd=128 --eval_iters=20"
GPU_SIZED = "GPU-sized (2 h 40 min a run on a 2-core CPU): the guide gives them to type instead of the CPU-sized runs above"


def gpu_sized(words):
    line = " ".join(words)
    return "train.py config/train_shakespeare_char.py" in line and CPU_SIZED not in line


def why_skipped(words):
    return GPU_SIZED if gpu_sized(words) else skipped(words)


def test_the_chinese_guide_lists_its_commands_in_a_safe_order():
    commands = readme_commands(ZH)
    lines = [" ".join(c) for c in commands]
    assert lines[0] == "pip install -r requirements.txt"  # the README's two commands open it
    training = [c for c in lines if c.startswith("python train.py")]
    assert "config/train_shakespeare_char_fast.py" in training[0] and len(training) >= 6, training
    # every GPU-sized run comes after the CPU-sized ones, and says so with its CPU time just before it
    gpu = [i for i, c in enumerate(commands) if gpu_sized(c)]
    assert gpu and all(not gpu_sized(c) for c in commands[:gpu[0]])
    first = next(line for line in ZH.splitlines() if line.startswith("    ") and gpu_sized(line.split()))
    before = ZH.split("\n" + first + "\n")[0].rsplit("\n", 1)[1]
    assert "GPU 规模" in before and "2 小时 40 分钟" in before, before
    # what a command reads, an earlier command that this test runs has made
    made = set()
    for words in commands:
        if why_skipped(words):
            continue
        if "tee" in words:
            made.add(words[-1])
        made.update(w.split("=", 1)[1] for w in words if w.startswith("--out_dir="))
        if words[1] == "tools/plot_loss.py":
            assert all(log in made for log in words[3:]), (words, made)
        if words[1] == "sample.py":
            assert next(w.split("=", 1)[1] for w in words if w.startswith("--out_dir=")) in made, words
    assert {"experiments/exp1_baseline.log", "experiments/exp1_large_lr.log"} <= made
    # the offline setup a reader behind a firewall needs first
    assert "data/shakespeare_char/input.txt" in ZH and "TIKTOKEN_CACHE_DIR" in ZH


@pytest.mark.slow
def test_the_chinese_guides_commands_run_in_order(tmp_path_factory, shakespeare_text, monkeypatch):
    clone = fresh_clone(tmp_path_factory.mktemp("readme_zh"), shakespeare_text)
    ran = []
    for line, r in run_in_order(readme_commands(ZH), clone, monkeypatch, why_skipped):
        ran.append(line)
        assert r.returncode == 0, failed(line, r)
    assert len(ran) >= 12
    assert (clone / "out-shakespeare-char-fast" / "ckpt.pt").exists() and (clone / "comparison.png").exists()
    for name in ("exp1_baseline", "exp1_large_lr"):  # the logs the tutorial's tools read: train.py's own lines
        log = (clone / "experiments" / f"{name}.log").read_text(encoding="utf-8")
        assert "step 4: train loss" in log and "training took" in log, log[-2000:]
    assert (clone / "experiments" / "exp3_comparison.png").exists()
