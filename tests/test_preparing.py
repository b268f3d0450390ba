"""Preparing datasets bigger than memory: streamed in chunks, on worker processes, from a file, a directory or JSONL,
byte for byte what one pass over the whole text gives, with one-line errors and nothing half-written."""
import json
import pickle
import shlex

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, run_script

from gpt_toolkit.core.locking import LOCK_NAME
from gpt_toolkit.core.tokenizer import GPT2Tokenizer, read_meta
from gpt_toolkit.data import preparing
from gpt_toolkit.data.preparing import DocumentSource, TextSource, prepare_dataset


def bins(d):
    return {s: (d / f"{s}.bin").read_bytes() for s in ("train", "val")}


def reference(text, tokenizer):
    """Today's rule, on the whole text at once: the first 90% of the characters train, the rest val."""
    cut = int(len(text) * 0.9)
    if tokenizer == "char":
        itos = sorted(set(text))
        stoi = {c: i for i, c in enumerate(itos)}
        encode = lambda t: [stoi[c] for c in t]  # noqa: E731
    else:
        encode = GPT2Tokenizer().encode
    return {s: np.array(encode(part), dtype=np.uint16).tobytes() for s, part in (("train", text[:cut]), ("val", text[cut:]))}


@pytest.fixture(scope="module")
def mixed_text(shakespeare_text):
    """About 2.4 MB with multi-byte characters everywhere, so block and chunk edges fall inside characters."""
    return (shakespeare_text + "\n東京の夜 — café naïve 🙂 Grüße\n") * 2


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_a_file_in_small_chunks_on_two_processes_equals_the_whole(tmp_path, monkeypatch, mixed_text, tokenizer):
    path = tmp_path / "in.txt"
    path.write_text(mixed_text, encoding="utf-8")
    monkeypatch.setattr(preparing, "CHUNK_BYTES", 65_537)  # chunks far smaller than the text, cut mid-character
    monkeypatch.setattr(preparing, "SEARCH_BYTES", 3)  # the search for a safe BPE cut grows its window
    expected = reference(mixed_text, tokenizer)
    for num_proc in (1, 2):
        out = tmp_path / f"p{num_proc}"
        summary = prepare_dataset(TextSource(path), out, tokenizer, num_proc=num_proc, progress=False)
        assert bins(out) == expected, num_proc
        assert summary["train"] == len(expected["train"]) // 2
    meta = read_meta(tmp_path / "p1")
    if tokenizer == "char":
        assert meta["itos"] == sorted(set(mixed_text))
        nano = pickle.loads((tmp_path / "p1" / "meta.pkl").read_bytes())
        assert nano["stoi"]["東"] == meta["itos"].index("東")
    else:
        assert {k: v for k, v in meta.items() if k != "files"} == {"tokenizer": "gpt2", "vocab_size": 50257,
                                                                   "eot_token": 50256}


def test_shakespeare_comes_out_as_before(tmp_path, shakespeare_text, data_dir):
    """The datasets prepared before this change (nanoGPT's token counts) are reproduced exactly."""
    src = tmp_path / "input.txt"
    src.write_text(shakespeare_text, encoding="utf-8")
    r = run_script("data/shakespeare_char/prepare.py", "--input", src, "--out_dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert bins(tmp_path / "c") == bins(data_dir / "shakespeare_char") == reference(shakespeare_text, "char")
    assert len(bins(tmp_path / "c")["val"]) // 2 == 111_540


def test_documents_from_a_directory_and_from_jsonl(tmp_path):
    docs = [f"Document {i}: " + "word " * (5 + i) for i in range(10)]
    (tmp_path / "dir").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "dir" / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    lines = [json.dumps({"content": d}) for d in docs]
    lines.insert(3, "")  # blank lines are not documents
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    enc = GPT2Tokenizer()
    # the documents are one stream cut as a text file is: 90% of their text's bytes train, the document at the cut
    # split there (its head ends train with no end-of-text: it goes on in val)
    cut = int(sum(map(len, docs)) * 0.9)
    at, seen = next((i, sum(map(len, docs[:i]))) for i in range(len(docs)) if sum(map(len, docs[:i + 1])) > cut)
    head, tail = docs[at][:cut - seen], docs[at][cut - seen:]
    assert head and tail
    expected = {"train": [t for d in docs[:at] for t in enc.encode_ordinary(d) + [50256]] + enc.encode_ordinary(head),
                "val": [t for d in [tail, *docs[at + 1:]] for t in enc.encode_ordinary(d) + [50256]]}
    for name, source in (("d", DocumentSource(tmp_path / "dir")), ("j", DocumentSource(tmp_path / "docs.jsonl", "content"))):
        prepare_dataset(source, tmp_path / name, "gpt2", num_proc=2, progress=False)
        got = {s: np.fromfile(tmp_path / name / f"{s}.bin", dtype=np.uint16).tolist() for s in ("train", "val")}
        assert got == expected, name
    prepare_dataset(DocumentSource(tmp_path / "dir"), tmp_path / "c", "char", num_proc=1, progress=False)
    itos = read_meta(tmp_path / "c")["itos"]
    decoded = {s: "".join(itos[i] for i in np.fromfile(tmp_path / "c" / f"{s}.bin", dtype=np.uint16))
               for s in ("train", "val")}
    assert decoded["train"] == "".join(d + "\n\n" for d in docs[:at]) + head  # char documents end with a blank line
    assert decoded["val"] == "".join(d + "\n\n" for d in [tail, *docs[at + 1:]])


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_a_few_documents_split_about_ten_percent_of_the_tokens(tmp_path, shakespeare_text, tokenizer):
    """Four files of different sizes: val holds about val_fraction of the tokens (whole documents gave one file: 36%)."""
    (tmp_path / "corpus").mkdir()
    sizes = [40_000, 25_000, 20_000, 36_000]
    start = 0
    for i, size in enumerate(sizes):
        (tmp_path / "corpus" / f"{i}.txt").write_text(shakespeare_text[start:start + size], encoding="utf-8")
        start += size
    counts = prepare_dataset(DocumentSource(tmp_path / "corpus"), tmp_path / "out", tokenizer, num_proc=1,
                             progress=False)
    assert 0.09 < counts["val"] / (counts["train"] + counts["val"]) < 0.11, counts


def test_bad_inputs_are_one_line_errors_and_leave_the_old_dataset(tmp_path, data_dir):
    target = tmp_path / "data"
    (target / "x").mkdir(parents=True)
    good = tmp_path / "good.txt"
    good.write_text("hello there, general kenobi. " * 50, encoding="utf-8")
    assert run_script("data/prepare_text.py", f"--input={good}", "--name=x", f"--data_dir={target}").returncode == 0
    def files():  # the dataset's, not its lock file (which names the last preparation's process)
        return sorted((p.name, p.read_bytes()) for p in (target / "x").iterdir() if p.name != LOCK_NAME)
    before = files()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 1000 + b"\xff\xfe" + b"more" * 10)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"}\nnot json\n', encoding="utf-8")
    (tmp_path / "field.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "wide.txt").write_text("".join(chr(c) for c in range(0x20000, 0x20000 + 70_000)) * 2, encoding="utf-8")
    cases = [(bad, "is not UTF-8 text (invalid start byte at byte 10000)"), (empty_dir, "has no files"),
             (tmp_path / "bad.jsonl", "bad.jsonl line 3 is not JSON"),
             (tmp_path / "field.jsonl", "field.jsonl line 2 has no text field 'text'"),
             (tmp_path / "empty.txt", "is empty"), (tmp_path / "missing.txt", "not found"),
             (tmp_path / "wide.txt", "text has 70000 distinct characters; uint16 ids allow 65535: use --tokenizer=gpt2")]
    for path, message in cases:
        for tokenizer in ("char",) if path.name == "wide.txt" else ("char", "gpt2"):
            r = run_script("data/prepare_text.py", f"--input={path}", "--name=x", f"--data_dir={target}",
                           f"--tokenizer={tokenizer}")
            assert_one_line_error(r, message)
            assert files() == before, (path, tokenizer)


def test_an_interrupt_midway_leaves_no_partial_files(tmp_path, monkeypatch, mixed_text):
    out = tmp_path / "ds"
    (tmp_path / "old.txt").write_text("old text, " * 100, encoding="utf-8")
    prepare_dataset(TextSource(tmp_path / "old.txt"), out, "char", num_proc=1, progress=False)

    def contents():  # every file and its bytes; the lock file's line names the second it was taken, so its name only
        return sorted((p.name, b"" if p.name == LOCK_NAME else p.read_bytes()) for p in out.iterdir())

    before = contents()
    calls = {"n": 0}
    real = preparing._encode_range

    def interrupted(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(preparing, "_encode_range", interrupted)
    monkeypatch.setattr(preparing, "CHUNK_BYTES", 100_000)
    (tmp_path / "mixed.txt").write_text(mixed_text, encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(TextSource(tmp_path / "mixed.txt"), out, "gpt2", num_proc=1, progress=False)
    assert contents() == before  # no temp files either


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_a_file_cut_inside_a_character_is_named_with_the_offset(tmp_path, tokenizer):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"fine text " * 100 + "é".encode()[:1])
    with pytest.raises(preparing.UserError, match=r"is not UTF-8 text \(it ends inside a character, at byte 1000\)"):
        prepare_dataset(TextSource(path), tmp_path / "out", tokenizer, num_proc=1, progress=False)
    assert not (tmp_path / "out" / "train.bin").exists()


def test_the_command_prepare_text_prints_trains_as_printed(tmp_path, shakespeare_text):
    """Its last line is a command sized for a CPU, with its own out_dir: it runs as printed (a few steps added)."""
    notes = tmp_path / "notes.txt"
    notes.write_text(shakespeare_text[:50_000], encoding="utf-8")
    r = run_script("data/prepare_text.py", f"--input={notes}", "--name=notes", f"--data_dir={tmp_path / 'data'}",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip().splitlines()[-1].split("train with  python ")[1].split("  (")[0]
    assert printed == "train.py config/train_shakespeare_char_cpu.py --dataset=notes --out_dir=out-notes"  # data/ here
    args = shlex.split(printed)
    args[1] = str(ROOT / args[1])
    r = run_script(*args, "--max_iters=2", "--eval_iters=1", "--eval_interval=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out-notes" / "ckpt.pt").exists()
    r = run_script("data/prepare_text.py", f"--input={notes}", "--name=notes", f"--data_dir={tmp_path / 'elsewhere'}",
                   cwd=tmp_path)
    assert f"--dataset=notes --data_dir={tmp_path / 'elsewhere'} --out_dir=out-notes" in r.stdout  # not ./data: named


def test_the_encoded_line_comes_after_the_progress_bar_not_under_it(tmp_path, shakespeare_text):
    """The bar (stderr) is closed before the 'encoded ...' line (stdout): said while the bar was live, the bar's last
    redraw landed on that line's start in a terminal (issue 55 item 10)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    source = tmp_path / "input.txt"
    source.write_text(shakespeare_text[:200_000], encoding="utf-8")
    r = subprocess.run([sys.executable, "data/prepare_text.py", f"--input={source}", "--name=t", f"--data_dir={tmp_path}"],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=120)
    assert r.returncode == 0, r.stdout
    assert "100%|" in r.stdout and r.stdout.rindex("100%|") < r.stdout.index("\nencoded "), r.stdout
