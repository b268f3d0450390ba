"""Preparing datasets (char and gpt2), reading vocabularies, and batches."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, build_dataset, drop_file_list, run_script

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.tokenizer import CharTokenizer, read_meta, tokenizer_from_meta
from gpt_toolkit.data.dataset import BatchPlan, Dataset, batch_at
from gpt_toolkit.data.preparing import prepare_main


def step_batches(data, step, *, accum_steps, **plan):  # a BatchPlan's micro-batches of step `step`
    return BatchPlan(gradient_accumulation_steps=accum_steps, **plan).rows(data, step)


def test_char_dataset_matches_nanogpt(data_dir):
    d = data_dir / "shakespeare_char"
    train_ids = np.fromfile(d / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(d / "val.bin", dtype=np.uint16)
    assert (len(train_ids), len(val_ids)) == (1_003_854, 111_540)  # nanoGPT's numbers for tiny-shakespeare
    with open(d / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == 65 and meta["itos"][0] == "\n" and meta["stoi"]["a"] == 39
    assert json.loads((d / "meta.json").read_text())["itos"] == [meta["itos"][i] for i in range(65)]
    assert train_ids.max() == 64
    tok = tokenizer_from_meta(read_meta(d))
    assert tok.decode(train_ids[:14].tolist()) == "First Citizen:"


def test_gpt2_dataset_matches_nanogpt(tmp_path, shakespeare_text):
    summary = build_dataset(shakespeare_text, tmp_path, "gpt2", progress=False)
    assert (summary["train"], summary["val"]) == (301_966, 36_059)  # nanoGPT's data/shakespeare numbers
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert ids.max() < 50257 and not (tmp_path / "meta.pkl").exists()
    meta = read_meta(tmp_path)
    assert {k: v for k, v in meta.items() if k != "files"} == {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    assert {name: entry["bytes"] for name, entry in meta["files"].items()} == {
        "train.bin": (tmp_path / "train.bin").stat().st_size, "val.bin": (tmp_path / "val.bin").stat().st_size}
    assert tokenizer_from_meta(read_meta(tmp_path)).decode(ids[:3].tolist()) == "First Citizen:"


def test_prepare_script_with_input(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("hello world, hello there. " * 40, encoding="utf-8")
    r = run_script("data/shakespeare_char/prepare.py", "--input", text, "--out_dir", tmp_path / "ds")
    assert r.returncode == 0, r.stderr
    assert "vocab size 11" in r.stdout
    assert read_meta(tmp_path / "ds")["vocab_size"] == 11
    assert os.path.getsize(tmp_path / "ds" / "train.bin") == 2 * int(len(text.read_text()) * 0.9)


def test_prepare_offline_without_input_says_how_to_supply_it(tmp_path):
    # a dataset directory with no input.txt, and a URL nothing answers on
    with pytest.raises(UserError) as e:
        prepare_main(["--url", "http://127.0.0.1:9/input.txt"], "test", tmp_path, "char")
    message = str(e.value)
    assert "could not download http://127.0.0.1:9/input.txt" in message
    assert f"save the text as {tmp_path / 'input.txt'} or pass --input PATH" in message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_prepare_text_makes_a_trainable_dataset(tmp_path):
    text = tmp_path / "poem.txt"
    text.write_text("roses are red, violets are blue\n" * 200, encoding="utf-8")
    r = run_script("data/prepare_text.py", f"--input={text}", "--name=poem", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    ds = Dataset(tmp_path, "poem")
    assert ds.vocab_size == len(set(text.read_text()))


def test_prepare_rejects_non_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1") * 10)
    r = run_script("data/prepare_text.py", f"--input={bad}", "--name=x", f"--data_dir={tmp_path}")
    assert_one_line_error(r, "is not UTF-8 text")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_get_batch_shapes_dtype_and_shift(data_dir):
    ds = Dataset(data_dir, "shakespeare_char")
    data = ds.splits["train"]
    offsets = np.array([0, 5, 1000])
    X, Y = batch_at(data, offsets, block_size=16)
    assert X.shape == Y.shape == (3, 16) and X.dtype == Y.dtype == torch.int64
    assert torch.equal(X[:, 1:], Y[:, :-1])
    assert X[1].tolist() == data[5:21].tolist() and Y[1].tolist() == data[6:22].tolist()


def test_step_rows_do_not_depend_on_micro_split(data_dir):
    data = Dataset(data_dir, "shakespeare_char").splits["train"]
    one = step_batches(data, 7, batch_size=64, accum_steps=1, block_size=32, seed=1337, device="cpu")
    four = step_batches(data, 7, batch_size=16, accum_steps=4, block_size=32, seed=1337, device="cpu")
    assert len(one) == 1 and len(four) == 4 and four[0][0].shape == (16, 32)
    assert torch.equal(one[0][0], torch.cat([x for x, _ in four]))
    assert torch.equal(one[0][1], torch.cat([y for _, y in four]))
    # DDP ranks take consecutive shares of the same rows
    rank0 = step_batches(data, 7, batch_size=16, accum_steps=4, block_size=32, seed=1337, device="cpu", rank=0,
                         world_size=2)
    rank1 = step_batches(data, 7, batch_size=16, accum_steps=4, block_size=32, seed=1337, device="cpu", rank=1,
                         world_size=2)
    assert torch.equal(torch.cat([x for x, _ in rank0 + rank1]), one[0][0])
    other_step = step_batches(data, 8, batch_size=64, accum_steps=1, block_size=32, seed=1337, device="cpu")
    assert not torch.equal(other_step[0][0], one[0][0])


def test_truncated_bin_and_foreign_ids(tmp_path, data_dir):
    d = tmp_path / "broken"
    d.mkdir()
    for name in ("train.bin", "val.bin", "meta.json", "meta.pkl"):
        (d / name).write_bytes((data_dir / "shakespeare_char" / name).read_bytes())
    with open(d / "train.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(UserError, match="odd byte count"):
        Dataset(tmp_path, "broken")
    ids = np.fromfile(data_dir / "shakespeare_char" / "train.bin", dtype=np.uint16)
    ids[100] = 70
    ids.tofile(d / "train.bin")
    with pytest.raises(UserError, match="train.bin is not the file meta.json lists"):  # prepared here: listed
        Dataset(tmp_path, "broken")
    drop_file_list(d)  # made by hand, or by nanoGPT's scripts: the ids themselves are checked
    with pytest.raises(UserError, match="holds token id 70 but vocab_size is 65"):
        Dataset(tmp_path, "broken").check_token_ids(65)


def test_char_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer(["a", "b", " "])
    assert tok.decode(tok.encode("ab ba")) == "ab ba"
    with pytest.raises(UserError, match=r"2 character\(s\) outside this dataset's vocabulary: 'xz'"):
        tok.encode("axbz")


def test_hostile_meta_pkl_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": Evil()}))
    with pytest.raises(UserError, match="unreadable .*only plain data is allowed"):
        read_meta(tmp_path)


def test_nanogpt_meta_pkl_is_read(tmp_path):
    chars = ["\n", "a", "b"]
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": dict(enumerate(chars)),
                                                       "stoi": {c: i for i, c in enumerate(chars)}}))
    assert read_meta(tmp_path) == {"tokenizer": "char", "vocab_size": 3, "itos": chars}


def test_token_stream_writer(tmp_path):
    from gpt_toolkit.data.preparing import write_token_stream
    total = write_token_stream(iter([[1, 2, 50256], np.array([7, 50256])]), tmp_path / "train.bin")
    assert total == 5 and np.fromfile(tmp_path / "train.bin", dtype=np.uint16).tolist() == [1, 2, 50256, 7, 50256]
    with pytest.raises(UserError, match="does not fit in uint16"):
        write_token_stream(iter([[1], [70000]]), tmp_path / "val.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin"]  # no partial val.bin or temp file


def test_openwebtext_prepare_without_datasets_package(tmp_path):
    # as where it is not installed (lm-eval, a test tool, brings it): a module of that name that cannot be imported
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "datasets.py").write_text("raise ImportError(\"No module named 'datasets'\")\n")
    r = run_script("data/openwebtext/prepare.py", "--out_dir", tmp_path, env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert_one_line_error(r, "data/openwebtext/prepare.py needs the datasets package: pip install datasets")


def test_max_train_tokens_limits_the_train_split(data_dir):
    ds = Dataset(data_dir, "shakespeare_char", max_train_tokens=5000)
    assert len(ds.splits["train"]) == 5000 and len(ds.splits["val"]) == 111_540
    offsets = step_batches(ds.splits["train"], 3, batch_size=64, accum_steps=4, block_size=32, seed=1337, device="cpu")
    full = np.fromfile(data_dir / "shakespeare_char" / "train.bin", dtype=np.uint16)[:5000]
    rows = {tuple(full[i:i + 32]) for i in range(5000 - 32)}
    assert all(tuple(x.tolist()) in rows for xs, _ in offsets for x in xs)
    with pytest.raises(UserError, match=r"block_size=6000 is too long for the train split .*\(5000 tokens\)"):
        ds.check_block_size(6000)
