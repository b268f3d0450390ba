"""Your own tokenizer: a byte-level BPE trained on the train split of your text (Hugging Face's tokenizers), encoded
through tiktoken with the same ids, decoding every text back exactly; it travels into exports (AutoTokenizer and the
text-generation pipeline read it, as they read an exported character vocabulary); bits per byte compare models whose
tokens differ."""
import json
import math
import os
import re
import stat

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.bpe import EOT, train_bpe
from gpt_toolkit.core.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, read_meta
from gpt_toolkit.data.preparing import TextSource, TokenizerChoice, prepare_dataset
from gpt_toolkit.models.huggingface import load_hf_dir

CHINESE = ("床前明月光，疑是地上霜。举头望明月，低头思故乡。" "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"
           "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。") * 40
HARD = ["汉字测试，中文分词。", "日本語のテキスト、カタカナとひらがな。", "emoji 😀👍🏽 👨‍👩‍👧 family",
        "def f(x):\n\treturn x  \n\n",
        "trailing spaces   \n\t\ttabs\r\nwindows", "e\u0301 a\u0308 \u200d \ufeff bom \ufffd replacement \U0010ffff last",
        "\x00 nul and \x7f del", "<|endoftext|> is one token", ""]


@pytest.fixture(scope="module")
def chinese_bpe(tmp_path_factory):
    """A BPE of 400 ids trained on Chinese text (its train split), as data/prepare_text.py makes it."""
    root = tmp_path_factory.mktemp("zh")
    (root / "zh.txt").write_text(CHINESE + "\n" + "".join(HARD[:4]) * 20, encoding="utf-8")
    summary = prepare_dataset(TextSource(root / "zh.txt"), root / "data" / "zh", TokenizerChoice("bpe", vocab_size=400),
                              progress=False, num_proc=2, report=lambda line: None)
    return root / "data", summary


def test_every_text_decodes_back_exactly_and_the_ids_are_the_tokenizers_own(chinese_bpe):
    from tokenizers import Tokenizer
    data, summary = chinese_bpe
    meta = read_meta(data / "zh")
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == summary["vocab_size"] == 400 and meta["eot_token"] == 0
    ours, theirs = BPETokenizer(meta["tokenizer_json"]), Tokenizer.from_str(meta["tokenizer_json"])
    for text in HARD + [CHINESE[:500]]:
        ids = ours.encode(text)
        assert ours.decode(ids) == text, text
        assert ids == theirs.encode(text).ids, text  # tiktoken from the merges: Hugging Face's ids, exactly
        assert b"".join(ours.token_bytes(i) for i in ids) == text.replace(EOT, "").encode("utf-8")
    assert len(ours.encode("床前明月光")) < len("床前明月光".encode())  # merges learned: fewer ids than bytes
    ids = np.fromfile(data / "zh" / "train.bin", dtype=np.uint16)
    assert ids.max() < 400 and ours.decode(ids[:200].tolist()) == (CHINESE + "\n")[:len(ours.decode(ids[:200].tolist()))]


def test_the_bpe_is_trained_on_the_train_split_only(tmp_path):
    train = "the quick brown fox jumps over the lazy dog. " * 400
    val = "zqxj" * 3000  # only in the last tenth: a BPE that saw it would merge these letters
    (tmp_path / "t.txt").write_text(train + val)
    prepare_dataset(TextSource(tmp_path / "t.txt"), tmp_path / "d", TokenizerChoice("bpe", vocab_size=300), progress=False,
                    val_fraction=len(val) / len(train + val), report=lambda line: None)
    vocab = json.loads((tmp_path / "d" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not [t for t in vocab if len(t) > 1 and set(t) <= set("zqxj")], "merged from the val split"
    assert "Ġthe" in vocab or "the" in vocab


@pytest.mark.parametrize("kind", ["directory", "jsonl"])
def test_documents_get_an_endoftext_between_them_and_packing_trains_on_them(tmp_path, kind, shakespeare_text):
    speeches = [s for s in shakespeare_text[:60000].split("\n\n") if s.strip()]
    if kind == "directory":
        (tmp_path / "docs").mkdir()
        for i, s in enumerate(speeches):
            (tmp_path / "docs" / f"{i:04d}.txt").write_text(s)
        source = tmp_path / "docs"
    else:
        source = tmp_path / "docs.jsonl"
        source.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    r = run_script("data/prepare_text.py", f"--input={source}", "--name=sp", f"--data_dir={tmp_path / 'data'}",
                   "--tokenizer=bpe", "--vocab_size=512")
    assert r.returncode == 0, r.stderr
    assert "trained a byte-level BPE of 512 tokens on all of the train split" in r.stdout
    ids = np.concatenate([np.fromfile(tmp_path / "data" / "sp" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert int((ids == 0).sum()) == len(speeches)  # one <|endoftext|> (id 0) after each document
    r = run_script("train.py", *TINY_TRAIN, "--dataset=sp", f"--data_dir={tmp_path / 'data'}", "--max_iters=20",
                   "--packing=True", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr


def test_a_big_corpus_is_learned_from_a_sample_and_the_output_says_how_much(tmp_path, shakespeare_text):
    (tmp_path / "big.txt").write_text(shakespeare_text)
    r = run_script("data/prepare_text.py", f"--input={tmp_path / 'big.txt'}", "--name=s", f"--data_dir={tmp_path}",
                   "--tokenizer=bpe", "--vocab_size=1024", "--bpe_sample_mb=0.25")
    assert r.returncode == 0, r.stderr
    assert re.search(r"trained a byte-level BPE of 1,024 tokens on a sample of 0.2 MB of its 1.0 MB \(--bpe_sample_mb\)",
                     r.stdout), r.stdout
    assert re.search(r"bpe vocab size 1,024; train [\d,]+ tokens, val [\d,]+ tokens \(0.\d+ tokens per byte\)", r.stdout)


def test_bad_bpe_settings_are_one_line_and_leave_the_dataset(tmp_path, shakespeare_text):
    (tmp_path / "t.txt").write_text(shakespeare_text[:20000])
    assert run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", "--name=x", f"--data_dir={tmp_path}"
                      ).returncode == 0
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "x").iterdir() if not p.name.startswith("."))
    for args, message in [(["--vocab_size=200"], "--vocab_size=200 must be from 257"),
                          (["--vocab_size=70000"], "to 65,536 (ids are stored as uint16"),
                          ([], "--tokenizer=bpe needs --vocab_size=N"),
                          (["--vocab_size=300", "--val_fraction=0.9999999"], "the train split is empty")]:
        r = run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", "--name=x", f"--data_dir={tmp_path}",
                       "--tokenizer=bpe", *args)
        assert_one_line_error(r, message)
        assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "x").iterdir() if not p.name.startswith(".")) == before
    r = run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", "--name=x", f"--data_dir={tmp_path}",
                   "--vocab_size=300")
    assert_one_line_error(r, "--vocab_size is for --tokenizer=bpe")


def test_a_corpus_with_fewer_pairs_than_asked_gets_the_vocabulary_it_has(tmp_path):
    (tmp_path / "t.txt").write_text("abab abab abab abab\n" * 50)
    r = run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", "--name=x", f"--data_dir={tmp_path}",
                   "--tokenizer=bpe", "--vocab_size=4096")
    assert r.returncode == 0, r.stderr
    got = int(re.search(r"the train text holds pairs for only ([\d,]+) tokens, fewer than the 4,096 asked for",
                        r.stdout).group(1).replace(",", ""))
    assert 257 < got < 300 and read_meta(tmp_path / "x")["vocab_size"] == got


def test_train_bpe_gives_the_eot_token_id_zero_then_the_bytes():
    spec = json.loads(train_bpe(["hello world " * 10], 280))
    vocab = spec["model"]["vocab"]
    assert vocab[EOT] == 0 and len([t for t, i in vocab.items() if 1 <= i <= 256]) == 256


# ----------------------------------------------------------------------------- it travels

@pytest.fixture(scope="module")
def trained_bpe(tmp_path_factory, shakespeare_text):
    root = tmp_path_factory.mktemp("bpe_run")
    (root / "s.txt").write_text(shakespeare_text[:200000])
    prepare_dataset(TextSource(root / "s.txt"), root / "data" / "sb", TokenizerChoice("bpe", vocab_size=512), progress=False,
                    report=lambda line: None)
    out = root / "out"
    r = run_script("train.py", *TINY_TRAIN, "--dataset=sb", f"--data_dir={root / 'data'}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return root, out


def test_an_exported_bpe_model_tokenizes_in_transformers_as_here(trained_bpe, tmp_path):
    from transformers import AutoTokenizer
    root, out = trained_bpe
    hf = tmp_path / "hf"
    r = run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={hf}")
    assert r.returncode == 0, r.stderr
    assert "bpe tokenizer" in r.stdout and (hf / "tokenizer.json").exists()
    ours = BPETokenizer((root / "data" / "sb" / "tokenizer.json").read_text())
    theirs = AutoTokenizer.from_pretrained(str(hf))
    for text in HARD[:-1] + ["ROMEO: what say you?"]:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids and theirs.decode(ids) == text, text
    modes = {stat.S_IMODE(p.stat().st_mode) for p in hf.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}  # model.safetensors too, not private
    a = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20",
                   "--seed=5", "--device=cpu", "--dtype=float32")
    b = run_script("sample.py", f"--init_from={hf}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20",
                   "--seed=5", "--device=cpu", "--dtype=float32")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout  # --init_from=DIR reads the tokenizer back


def test_a_character_model_travels_with_its_vocabulary_and_the_pipeline_generates(data_dir, tmp_path):
    from transformers import AutoTokenizer, pipeline
    out, hf = tmp_path / "out", tmp_path / "hf"
    assert run_script("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    assert run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={hf}").returncode == 0
    theirs = AutoTokenizer.from_pretrained(str(hf))
    ours = CharTokenizer(read_meta(data_dir / "shakespeare_char")["itos"])
    assert len(theirs) == 65 and theirs("ROMEO:\nHe's here")["input_ids"] == ours.encode("ROMEO:\nHe's here")
    generator = pipeline("text-generation", model=str(hf), tokenizer=theirs)
    text = generator("ROMEO:", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    model = load_hf_dir(hf).eval()
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ours.encode("ROMEO:")]), 20, top_k=1)[0].tolist()
    assert text == ours.decode(greedy)  # the pipeline generates what our model does, greedily


def test_fine_tuning_or_resuming_on_another_tokenizer_is_one_line(trained_bpe, data_dir, tmp_path):
    root, out = trained_bpe
    hf = tmp_path / "hf"
    assert run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={hf}").returncode == 0
    r = run_script("train.py", *TINY_TRAIN, f"--init_from={hf}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'ft'}")
    assert_one_line_error(r, f"init_from={hf} has the tokenizer bpe, 512 tokens (tokenizer ", "and dataset "
                          "'shakespeare_char' was prepared with char, 65 tokens")
    (root / "s2.txt").write_text((root / "s.txt").read_text()[::-1])  # other text: another BPE of the same size
    prepare_dataset(TextSource(root / "s2.txt"), tmp_path / "data" / "sb", TokenizerChoice("bpe", vocab_size=512), progress=False,
                    report=lambda line: None)
    r = run_script("train.py", *TINY_TRAIN, "--dataset=sb", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}",
                   "--init_from=resume", "--max_iters=80")
    assert_one_line_error(r, "the checkpoint's tokenizer (bpe, 512 tokens (tokenizer ", "is not dataset 'sb''s (bpe, "
                          "512 tokens (tokenizer ")


# ----------------------------------------------------------------------------- bits per byte

def hand_bits_per_byte(out, data_root, name, tokenizer):
    """Sum of the model's losses over every token of val (one window at a time, float32), over the UTF-8 bytes of
    the text those tokens encode, by hand."""
    from gpt_toolkit.models.checkpoint import load_checkpoint
    from gpt_toolkit.models.source import model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    ids = np.fromfile(data_root / name / "val.bin", dtype=np.uint16).astype(np.int64)
    T = model.config.block_size
    nats = 0.0
    with torch.no_grad():
        for a in range(0, len(ids) - 1, T):
            x = torch.tensor(ids[a:a + T][None])
            y = torch.tensor(ids[a + 1:a + T + 1][None])
            x = x[:, :y.size(1)]
            nats += model(x, y)[1].item() * y.numel()
    text_bytes = sum(len(tokenizer.token_bytes(int(i))) for i in ids[1:] if not (tokenizer.kind != "char" and i == (
        tokenizer.eot if tokenizer.kind == "bpe" else 50256)))
    return nats / math.log(2) / text_bytes, text_bytes


# GPT-2's 50k-row model is the slowest of the three, and BPE's multi-byte tokens are checked without it: the whole
# suite runs it
@pytest.mark.parametrize("kind", ["char", pytest.param("gpt2", marks=pytest.mark.slow), "bpe"])
def test_bits_per_byte_equal_a_hand_computation(tmp_path, kind, shakespeare_text):
    text = shakespeare_text[:30000] + "\n汉字 and 😀 in val too\n" * 40
    (tmp_path / "t.txt").write_text(text)
    vocab = {"bpe": ["--vocab_size=300"]}.get(kind, [])
    assert run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", "--name=d", f"--data_dir={tmp_path}",
                      f"--tokenizer={kind}", *vocab).returncode == 0
    out = tmp_path / "out"
    r = run_script("train.py", *TINY_TRAIN, "--dataset=d", f"--data_dir={tmp_path}", f"--out_dir={out}",
                   "--max_iters=20", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    meta = read_meta(tmp_path / "d")
    tokenizer = {"char": lambda: CharTokenizer(meta["itos"]), "gpt2": GPT2Tokenizer,
                 "bpe": lambda: BPETokenizer(meta["tokenizer_json"])}[kind]()
    expected, text_bytes = hand_bits_per_byte(out, tmp_path, "d", tokenizer)
    r = run_script("tools/evaluate.py", f"--out_dir={out}", "--dtype=float32", "--batch_size=3")
    m = re.search(r"; ([\d.]+) bits per byte over ([\d,]+) bytes", r.stdout)
    assert m, r.stdout + r.stderr
    assert int(m.group(2).replace(",", "")) == text_bytes
    assert float(m.group(1)) == pytest.approx(expected, abs=2e-4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [rec for rec in records if rec["type"] == "eval"]
    assert all(rec["val_bpb"] > 0 and rec["train_bpb"] > 0 for rec in evals)
    if kind == "char":  # a character of this text is mostly one byte: bits per byte a little under loss / ln 2
        assert all(rec["val_bpb"] <= rec["val_loss"] / math.log(2) + 1e-9 for rec in evals)


@pytest.mark.slow
def test_bench_prepare_times_the_bpe_training_and_the_rest_beside_tiktoken():
    r = run_script("tools/bench_prepare.py", "--size_mb=2", "--tokenizers=bpe", "--vocab_size=300", subprocess_only=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r"prepare_text --tokenizer=bpe +[\d.]+ MB/s \([\d.]+x tiktoken\), +[\d.]+ s, peak memory [\d,]+ MB "
                     r"\(all processes\)", r.stdout), r.stdout
    assert re.search(r"trained a byte-level BPE of 300 tokens on all of the train split in [\d.]+ s\n", r.stdout), r.stdout
    assert re.search(r"encoding \(and writing\) on \d process\(es\): +[\d.]+ MB/s \([\d.]+x tiktoken on one thread\)",
                     r.stdout), r.stdout
