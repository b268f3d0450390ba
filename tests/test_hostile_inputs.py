"""Hostile inputs: each gets one 'error:' line naming the problem and the fix, a non-zero exit, no traceback,
and leaves every file on disk as it was."""
import hashlib
import json
import random
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN, drop_file_list, run_script

import sample
import train
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.tokenizer import read_meta
from gpt_toolkit.models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """An out_dir holding a finished tiny run: checkpoints, logs, config.json."""
    out = tmp_path_factory.mktemp("done") / "out"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def ws(tmp_path, data_dir, finished_run):
    """A private copy of the dataset and of the finished run, free to damage."""
    (tmp_path / "data").mkdir()
    shutil.copytree(data_dir / "shakespeare_char", tmp_path / "data" / "shakespeare_char")
    shutil.copytree(finished_run, tmp_path / "out")
    return tmp_path


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def train_argv(ws, *extra):
    """A new run in ws/new; cases about the finished run in ws/out pass --out_dir themselves."""
    return [*TINY_TRAIN, "--max_iters=30", f"--data_dir={ws / 'data'}", f"--out_dir={ws / 'new'}", *extra]


def in_out(*args):
    return lambda ws: [f"--out_dir={ws / 'out'}", *args]


def corrupt_truncate(ws):
    p = ws / "out" / "latest.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def corrupt_random(ws):
    for name in ("latest.pt", "ckpt.pt"):
        (ws / "out" / name).unlink()
    # seed 2's bytes made torch's unpickler raise IndexError, which once escaped as a traceback
    (ws / "out" / "latest.pt").write_bytes(random.Random(2).randbytes(5000))


def odd_train_bin(ws):
    with open(ws / "data" / "shakespeare_char" / "train.bin", "ab") as f:
        f.write(b"\0")


def foreign_ids(ws):
    drop_file_list(ws / "data" / "shakespeare_char")  # a hand-made dataset: nothing lists its files
    ids = np.fromfile(ws / "data" / "shakespeare_char" / "train.bin", dtype=np.uint16)
    ids[1234] = 70
    ids.tofile(ws / "data" / "shakespeare_char" / "train.bin")


def edited_ids(ws):
    ids = np.fromfile(ws / "data" / "shakespeare_char" / "train.bin", dtype=np.uint16)
    ids[1234] = 1 + ids[1234] % 60  # the same size, another id
    ids.tofile(ws / "data" / "shakespeare_char" / "train.bin")


def write(name, text):
    def setup(ws):
        (ws / name).write_text(text)
    return setup


def no_checkpoint(ws):
    for p in (ws / "out").glob("*.pt"):
        p.unlink()


def file_as_parent(ws):
    (ws / "afile").write_text("not a directory")


def other_vocabulary(ws):
    meta = json.loads((ws / "data" / "shakespeare_char" / "meta.json").read_text())
    meta["itos"] = meta["itos"][::-1]
    (ws / "data" / "shakespeare_char" / "meta.json").write_text(json.dumps(meta))


def nanogpt_checkpoint_without_meta(ws):
    for name in ("latest.pt", "ckpt.pt"):
        ckpt = torch.load(ws / "out" / name, weights_only=True)
        del ckpt["meta"], ckpt["checksum"]  # nanoGPT writes neither
        ckpt["config"]["data_dir"] = str(ws / "nodata")
        torch.save(ckpt, ws / "out" / name)


def another_dataset(ws):
    """A second prepared dataset with the same vocabulary, so only its name differs from the checkpoint's."""
    shutil.copytree(ws / "data" / "shakespeare_char", ws / "data" / "other")


nothing = None
TRAIN_CASES = [
    ("config file missing", nothing, lambda ws: [ROOT / "config" / "nope.py"], "config file", "not found"),
    ("config syntax error", write("bad.py", "batch_size = 4\nn_layer = = 2\n"), lambda ws: [ws / "bad.py"],
     "bad.py, line 2: invalid syntax", "fix the Python syntax"),
    ("config assigns unknown key", write("unk.py", "lerning_rate = 1e-3\n"), lambda ws: [ws / "unk.py"],
     "unk.py, line 1: unknown config key 'lerning_rate'", "closest: learning_rate"),
    ("unknown --key", nothing, lambda ws: ["--lerning_rate=1e-3"], "unknown config key 'lerning_rate'", "learning_rate"),
    ("--batch_size=abc", nothing, lambda ws: ["--batch_size=abc"], "batch_size must be an int", "got 'abc'"),
    ("--compile=maybe", nothing, lambda ws: ["--compile=maybe"], "compile must be one of auto, True, False", ""),
    ("zero size", nothing, lambda ws: ["--n_layer=0"], "n_layer=0 must be positive", ""),
    ("negative size", nothing, lambda ws: ["--batch_size=-4"], "batch_size=-4 must be positive", ""),
    ("n_embd not divisible", nothing, lambda ws: ["--n_embd=384", "--n_head=5"],
     "n_embd=384 is not divisible by n_head=5", "use an n_head from"),
    ("block_size over the val split", nothing, lambda ws: ["--block_size=120000"],
     "too long for the val split", "--block_size=111539 or less"),
    ("dataset missing", nothing, lambda ws: ["--dataset=nothere"], "dataset 'nothere' is not prepared", "prepare"),
    ("train.bin odd bytes", odd_train_bin, lambda ws: [], "odd byte count", "re-run the prepare script"),
    ("ids over vocab", foreign_ids, lambda ws: [], "holds token id 70 but vocab_size is 65", "re-run"),
    ("a .bin edited after preparing", edited_ids, lambda ws: [], "train.bin is not the file meta.json lists",
     "re-run python data/shakespeare_char/prepare.py"),
    ("checkpoint truncated", corrupt_truncate, in_out("--init_from=resume"), "latest.pt is damaged", ""),
    ("checkpoint random bytes", corrupt_random, in_out("--init_from=resume"), "latest.pt is damaged", ""),
    ("resume without checkpoint", no_checkpoint, in_out("--init_from=resume"), "no checkpoint in", "init_from=scratch"),
    ("scratch over a checkpoint", nothing, in_out(), "already holds a checkpoint", "--overwrite=True"),
    ("resume with another vocabulary", other_vocabulary, in_out("--init_from=resume"),
     "the checkpoint's tokenizer (char, 65 tokens (characters ", "resume on the data the model was trained on"),
    ("resume with another dataset", another_dataset, in_out("--init_from=resume", "--dataset=other"),
     "checkpoint was trained on dataset 'shakespeare_char' but this run uses 'other'", "--dataset=shakespeare_char"),
    ("mask_token outside the vocabulary", nothing, lambda ws: ["--mask_prob=0.1", "--mask_token=65"],
     "mask_token=65 must be below the model's vocab_size 65", "-1 for random"),
    ("a model that cannot fit in memory", nothing, lambda ws: ["--n_layer=1000", "--n_embd=4096", "--n_head=32"],
     "the model's weights, gradients and AdamW state alone need", "use a smaller model"),
    ("a context that cannot fit in memory", nothing, lambda ws: ["--block_size=100000", "--dropout=0.1"],
     "even batch_size=1 does not fit at block_size=100000: use --batch_size=1 --block_size=", "--check_memory=False"),
    ("unwritable out_dir", file_as_parent, lambda ws: [f"--out_dir={ws / 'afile' / 'run'}"], "cannot write to out_dir", ""),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append(("cuda without cuda", nothing, lambda ws: ["--device=cuda"], "no usable CUDA GPU", "--device=cpu"))


@pytest.mark.parametrize("name, setup, args, fragment, fix", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_rejects(ws, capsys, name, setup, args, fragment, fix):
    if setup:
        setup(ws)
    before = snapshot(ws)
    code, out, err = run_cli(train.main, train_argv(ws, *args(ws)), capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0] and fix in lines[0], lines[0]
    assert snapshot(ws) == before, "a failed run changed files on disk"


SAMPLE_CASES = [
    ("meta missing for a char model", nanogpt_checkpoint_without_meta, lambda ws: [],
     "65-token vocabulary but", "has no meta.pkl or meta.json"),
    ("corrupt checkpoint", lambda ws: (ws / "out" / "ckpt.pt").write_bytes(b"garbage" * 100), lambda ws: [],
     "ckpt.pt is damaged", ""),
    ("out_dir does not exist", nothing, lambda ws: [f"--out_dir={ws / 'nope'}"], "does not exist", "--out_dir"),
    ("prompt outside the vocabulary", nothing, lambda ws: ["--start=naïve café €"],
     "3 character(s) outside this dataset's vocabulary: 'éï€'", "use only characters"),
    ("max_new_tokens zero", nothing, lambda ws: ["--max_new_tokens=0"], "max_new_tokens=0 must be positive", ""),
    ("temperature negative", nothing, lambda ws: ["--temperature=-1"], "temperature=-1.0 must be 0 (greedy) or "
     "positive", ""),
    ("top_p zero", nothing, lambda ws: ["--top_p=0"], "top_p=0.0 must be in (0, 1]", ""),
    ("top_p above one", nothing, lambda ws: ["--top_p=1.5"], "top_p=1.5 must be in (0, 1]", ""),
    ("min_p one", nothing, lambda ws: ["--min_p=1"], "min_p=1.0 must be in [0, 1)", ""),
    ("repetition_penalty zero", nothing, lambda ws: ["--repetition_penalty=0"], "repetition_penalty=0.0 must be "
     "positive", ""),
    ("missing prompt file", nothing, lambda ws: [f"--start=FILE:{ws / 'none.txt'}"], "prompt file", "not found"),
]


@pytest.mark.parametrize("name, setup, args, fragment, fix", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_rejects(ws, capsys, name, setup, args, fragment, fix):
    if setup:
        setup(ws)
    before = snapshot(ws)
    code, out, err = run_cli(sample.main, [f"--out_dir={ws / 'out'}", "--num_samples=1", "--max_new_tokens=5",
                                           "--device=cpu", *args(ws)], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0] and fix in lines[0], lines[0]
    assert snapshot(ws) == before


def test_overwrite_replaces_an_old_run_on_request(ws, capsys):
    code, out, _ = run_cli(train.main, train_argv(ws, f"--out_dir={ws / 'out'}", "--overwrite=True", "--max_iters=10"), capsys)
    assert code == 0
    assert torch.load(ws / "out" / "latest.pt", weights_only=True)["iter_num"] == 10
    old_log = (ws / "out" / "training.log.1").read_text()  # the old run's log is kept, not lost
    assert re.search(r"max_iters += 20", old_log) and "step 0:" in old_log
    assert "the earlier run's checkpoints are now replaced (its training.log.1, metrics.jsonl.1, config.json.1 kept)" \
        in out


@pytest.mark.slow
def test_disk_full_during_save_keeps_the_previous_checkpoint(ws):
    """A real write failure: the file-size limit makes the checkpoint write fail part-way (EFBIG)."""
    before = {n: (ws / "out" / n).read_bytes() for n in ("latest.pt", "ckpt.pt")}
    limit = len(before["latest.pt"]) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    resume = train_argv(ws, f"--out_dir={ws / 'out'}", "--init_from=resume", "--max_iters=40")
    cmd = [sys.executable, str(ROOT / "train.py"), *resume]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not save the checkpoint" in lines[0] and "File too large" in lines[0]
    assert "the previous checkpoint is intact" in lines[0]
    assert {n: (ws / "out" / n).read_bytes() for n in before} == before
    assert not list((ws / "out").glob(".*.gpt-toolkit-tmp"))


def test_random_bytes_for_a_checkpoint_or_vocabulary_are_one_line_errors(tmp_path):
    """Unpicklers fed damaged bytes raise all sorts of exceptions (IndexError, OverflowError, ...): 300 seeded
    random files in place of latest.pt and of meta.pkl each come out as the one-line error, never a traceback."""
    for seed in range(300):
        data = random.Random(seed).randbytes(5000)
        (tmp_path / "latest.pt").write_bytes(data)
        with pytest.raises(UserError, match="is damaged or not a checkpoint|is not a nanoGPT-style checkpoint"):
            load_checkpoint(tmp_path / "latest.pt")
        (tmp_path / "meta.pkl").write_bytes(data[:200])
        with pytest.raises(UserError, match="vocabulary file in .* (is unreadable|is not a char or gpt2)"):
            read_meta(tmp_path)
