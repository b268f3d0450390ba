"""Whole-split evaluation: every token of the split scored once, for our checkpoints and nanoGPT's."""
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, drop_file_list, run_script

from gpt_toolkit.models.checkpoint import load_checkpoint, save_checkpoint
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def run_and_small_data(data_dir, tmp_path_factory):
    """A tiny trained run, and a copy of its dataset cut to 1,001 val and 5,001 train tokens (so the reference below,
    one window at a time, stays quick); 1,000 is not a multiple of block_size 32, so the last window is shorter."""
    root = tmp_path_factory.mktemp("evaluate")
    out = root / "out"
    assert run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    shutil.copytree(data_dir / "shakespeare_char", root / "data" / "small")
    drop_file_list(root / "data" / "small")  # its .bin files are cut below
    for split, keep in (("val", 1001), ("train", 5001)):
        ids = np.fromfile(data_dir / "shakespeare_char" / f"{split}.bin", dtype=np.uint16)[:keep]
        ids.tofile(root / "data" / "small" / f"{split}.bin")
    return out, root / "data"


def reference_loss(out_dir, data):
    """Mean next-token loss over every window, one window at a time (no batching, float32)."""
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": 0.0})).eval()
    model.load_state_dict(ckpt["model"])
    T, total, count = model.config.block_size, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data) - 1, T):
            x = torch.from_numpy(data[s:min(s + T, len(data) - 1)].astype(np.int64))[None]
            y = torch.from_numpy(data[s + 1:min(s + T, len(data) - 1) + 1].astype(np.int64))[None]
            total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    return total / count, count


def test_whole_split_loss_scores_every_token_once(run_and_small_data):
    out, data_root = run_and_small_data
    r = run_script("tools/evaluate.py", f"--out_dir={out}", "--dataset=small", f"--data_dir={data_root}",
                   "--dtype=float32", "--batch_size=5")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"val loss ([\d.]+) \(perplexity ([\d.]+)\) over 1,000 tokens; [\d.]+ bits per byte over "
                     r"1,000 bytes\n", r.stdout)
    assert m, r.stdout
    expected, count = reference_loss(out, np.fromfile(data_root / "small" / "val.bin", dtype=np.uint16))
    assert count == 1000 and float(m.group(1)) == pytest.approx(expected, abs=1e-4)
    assert float(m.group(2)) == pytest.approx(math.exp(float(m.group(1))), rel=1e-3)


def test_nanogpt_checkpoint_and_the_train_split(run_and_small_data, tmp_path):
    out, data_root = run_and_small_data
    ours = load_checkpoint(out / "ckpt.pt")
    nano = tmp_path / "nano"
    nano.mkdir()
    save_checkpoint({"model": {"_orig_mod." + k: v for k, v in ours["model"].items()}, "optimizer": ours["optimizer"],
                     "model_args": ours["model_args"], "iter_num": 20, "best_val_loss": torch.tensor(3.0),
                     "config": {"dataset": "small", "data_dir": str(data_root)}}, nano / "ckpt.pt")
    same = run_script("tools/evaluate.py", f"--out_dir={nano}")
    mine = run_script("tools/evaluate.py", f"--out_dir={out}", "--dataset=small", f"--data_dir={data_root}")
    assert same.returncode == mine.returncode == 0 and same.stdout == mine.stdout
    train = run_script("tools/evaluate.py", f"--out_dir={out}", "--dataset=small", f"--data_dir={data_root}",
                       "--split=train", "--batch_size=64")
    assert re.fullmatch(r"train loss [\d.]+ \(perplexity [\d.]+\) over 5,000 tokens; [\d.]+ bits per byte over "
                        r"5,000 bytes\n", train.stdout), train.stdout
    assert_one_line_error(run_script("tools/evaluate.py", f"--out_dir={tmp_path / 'none'}"), "out_dir",
                          "does not exist (runs in ", ": nano)")
