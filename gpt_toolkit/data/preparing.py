"""Preparing a dataset from text, streamed: a text file, a directory of text files or a JSON Lines export, read and
tokenized in chunks on every core (worker processes) and written to train.bin/val.bin and the vocabulary files, all
together or not at all. Memory stays bounded by the chunks in flight, whatever the size of the input. The workers
read a text file themselves, in byte ranges (a first pass counts its characters, and collects a char vocabulary; a
second tokenizes), so this process only hands out offsets and writes; documents are read here.

Splits. A single text file: its first (1 - val_fraction) of the characters are train, the rest val,
as nanoGPT's shakespeare scripts cut it (a dataset prepared before comes out byte for byte the same). Documents
(a directory's files in sorted order, or JSONL lines) are one stream cut the same way: the first (1 - val_fraction)
of their text's bytes are train, the rest val, the document at the cut split at a character (whole documents would
give val 36% of the tokens of four files); gpt2 puts the end-of-text token after each document (as
data/openwebtext/prepare.py), char a blank line ("\\n\\n").
"""
import collections
import contextlib
import functools
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_toolkit.core import system
from gpt_toolkit.core.bpe import EOT, MAX_VOCAB, MIN_VOCAB, tiktoken_encoding, train_bpe
from gpt_toolkit.core.errors import UserError, child_signals, forking_children
from gpt_toolkit.core.files import atomic_write, fingerprint, remove_stale_temps, replace_together
from gpt_toolkit.core.locking import LOCK_NAME, DirectoryLock
from gpt_toolkit.core.tokenizer import (
    BPE_FILE,
    GPT2_EOT,
    GPT2_VOCAB_SIZE,
    TINY_SHAKESPEARE_URL,
    TOKENIZERS,
    GPT2Tokenizer,
    download,
)

CHUNK_BYTES = 1 << 20  # a worker reads and tokenizes about this much of a file per task
CHUNK_CHARS = 1 << 20  # documents are tokenized in batches of about this many characters
SEARCH_BYTES = 1 << 16  # how far past a chunk's nominal end to look for a safe BPE cut first (then 4x, ...)
MAX_CARRY = 16 << 20  # text without a safe BPE cut point is cut here anyway (see _bpe_cut)
DOC_SEPARATOR = "\n\n"  # between character-level documents
DATASET_EXTRAS = ("meta.pkl", BPE_FILE, "train.mask.bin", "val.mask.bin")  # besides train.bin, val.bin, meta.json
BPE_SAMPLE_MB = 100  # a BPE is trained on at most this much of the train split (--bpe_sample_mb)


# ----------------------------------------------------------------------------- sources

class TextSource:
    """One text file, read in byte ranges by the workers (decoded strictly, so a byte that is not UTF-8 is named with
    its offset)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"input file '{path}' not found: check the path") from None
        if self.size == 0:
            raise UserError(f"input '{path}' is empty: give a file with some text in it")


def _decode(data, *, path, offset, at_end):
    """data (the file's bytes from offset) as text; a one-line UserError naming the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if at_end and e.reason == "unexpected end of data" and e.end == len(data):
            where = f"it ends inside a character, at byte {offset + e.start}"
        else:
            where = f"{e.reason} at byte {offset + e.start}"
        raise UserError(f"input file '{path}' is not UTF-8 text ({where}): convert it to UTF-8") from None


def _read(path, start, stop):
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


def _read_text(path, start, stop, data=None):
    """Bytes start..stop of the file (data, when already read) decoded strictly, as _decode says."""
    data = _read(path, start, stop) if data is None else data
    return _decode(data, path=path, offset=start, at_end=stop == os.path.getsize(path))


def _char_starts(data):
    """Where characters start in UTF-8 bytes: every byte that does not continue a sequence (no decoding needed)."""
    return (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80


def _char_start(f, pos, end):
    """The first offset at or after pos that does not continue a UTF-8 character (end at the latest)."""
    if pos >= end:
        return end
    f.seek(pos)
    for i, byte in enumerate(f.read(min(4, end - pos))):
        if byte & 0xC0 != 0x80:
            return pos + i
    return min(pos + 4, end)  # not UTF-8 here: the worker that decodes it names the byte


def _bpe_cut(f, pos, end):
    """The first offset at or after pos (a character start) where GPT-2's pre-tokenizer splits the text anyway (see
    _safe_cut), so the two sides encode to the tokens of the whole; found in a window that grows 4x at a time. Text
    with no such point for MAX_CARRY bytes is cut there anyway (a boundary that may differ from encoding the whole)."""
    left = _char_start(f, max(pos - 16, 0), end)  # _safe_cut looks two characters back
    size = SEARCH_BYTES
    while True:
        f.seek(left)
        data = f.read(min(pos - left + size, end - left))
        text = data.decode("utf-8", "surrogateescape")  # bytes that are not UTF-8 stay one character each
        i = _safe_cut(text, len(data[:pos - left].decode("utf-8", "surrogateescape")))
        if i is not None:
            return left + len(text[:i].encode("utf-8", "surrogateescape"))
        if left + len(data) >= end:
            return end
        if size >= MAX_CARRY:
            return _char_start(f, pos + MAX_CARRY, end)
        size *= 4


def _ranges(path, start, stop, cut):
    """(path, a, b) byte ranges of about CHUNK_BYTES covering start..stop, each ending where cut(f, pos, stop) says."""
    with open(path, "rb") as f:
        while start < stop:
            b = stop if stop - start <= CHUNK_BYTES else cut(f, _char_start(f, start + CHUNK_BYTES, stop), stop)
            yield (str(path), start, b)
            start = b


class DocumentSource:
    """Documents: every file of a directory (sorted by name, recursively), or the text field of every non-blank
    line of a JSON Lines file."""

    def __init__(self, path, text_field="text"):
        self.path, self.text_field = Path(path), text_field
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not self.files:
                raise UserError(f"input directory '{path}' has no files: put one text file per document in it")
            self.size = sum(p.stat().st_size for p in self.files)
            self.count = len(self.files)
        else:
            self.files = None
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                self.count = sum(1 for line in f if line.strip())
        if self.count == 0:
            raise UserError(f"input '{path}' holds no documents (every line is blank)")

    def text_bytes(self):
        """The UTF-8 bytes of all the documents' text: a directory's file sizes; a JSONL file's text fields, read."""
        if self.files is not None:
            return self.size
        return sum(len(doc.encode("utf-8")) for doc in self.documents(lambda n: None))

    def documents(self, progress):
        """Each document's text, in order; progress(n) with the bytes each came from."""
        if self.files is not None:
            for p in self.files:
                data = p.read_bytes()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"document '{p}' is not UTF-8 text ({e.reason} at byte {e.start}): convert it "
                                    f"to UTF-8") from None
                progress(len(data))
                yield text
            return
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                progress(len(line))
                if not line.strip():
                    continue
                where = f"{self.path} line {number}"
                try:
                    record = json.loads(line)
                except UnicodeDecodeError as e:
                    raise UserError(f"{where} is not UTF-8 text ({e.reason}): convert the file to UTF-8") from None
                except ValueError as e:
                    raise UserError(f"{where} is not JSON ({e}): each line must be one JSON object") from None
                except RecursionError:
                    raise UserError(f"{where} is not JSON this toolkit reads (nested too deep): each line must be one "
                                    f"JSON object") from None
                if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
                    raise UserError(f"{where} has no text field '{self.text_field}': pass --text_field=NAME, the key "
                                    f"that holds each document's text")
                text = record[self.text_field]
                if not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as e:  # JSON's \ud800 escapes can name half of a character
                        raise UserError(f"{where}: its text holds {text[e.start]!r} at character {e.start}, half of a "
                                        f"UTF-16 pair that is no character: fix that line (or drop it)") from None
                yield text


def open_source(path, text_field="text"):
    """A TextSource for a text file, a DocumentSource for a directory or a .jsonl file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input '{path}' not found: check the path")
    if path.is_dir() or path.suffix.lower() == ".jsonl":
        return DocumentSource(path, text_field)
    return TextSource(path)


# ----------------------------------------------------------------------------- tokenizing, in worker processes

_encoder = None  # set in each worker (and in this process for num_proc=1) by _init


def _init(kind, vocabulary):
    """The encoder for `kind`: vocabulary is the char list (char) or the tokenizer.json (bpe)."""
    global _encoder
    encoders = {"char": _CharEncoder, "gpt2": lambda _: _TiktokenEncoder(GPT2Tokenizer().enc),
                "bpe": lambda spec: _TiktokenEncoder(tiktoken_encoding(spec))}
    _encoder = None if kind is None else encoders[kind](vocabulary)


class _CharEncoder:
    def __init__(self, itos):
        codes = np.array([ord(c) for c in itos], dtype=np.int64)
        self.lut = np.zeros(int(codes.max()) + 1, dtype=np.uint16)
        self.lut[codes] = np.arange(len(itos), dtype=np.uint16)

    def encode(self, text):
        ids = self.lut[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
        return ids.tobytes()

    def encode_documents(self, docs, open_last=False):
        """Each document and a separator; none after the last with open_last (a document the split cuts)."""
        text = "".join(d + DOC_SEPARATOR for d in docs)
        return self.encode(text[:-len(DOC_SEPARATOR)] if open_last and docs else text)


class _TiktokenEncoder:
    """GPT-2's BPE, or an own one built by bpe.tiktoken_encoding: both have <|endoftext|>."""

    def __init__(self, enc):
        self.enc = enc

    def encode(self, text):  # a literal <|endoftext|> separates documents
        return self.enc.encode_to_numpy(text, allowed_special={EOT}).astype(np.uint16).tobytes()

    def encode_documents(self, docs, open_last=False):
        eot = np.array([self.enc.encode_single_token(EOT)], dtype=np.uint32)
        parts = [a for doc in docs for a in (self.enc.encode_to_numpy(doc, disallowed_special=()), eot)]
        if open_last and parts:
            parts.pop()
        parts = parts or [np.zeros(0, dtype=np.uint32)]
        return np.concatenate(parts).astype(np.uint16).tobytes()


def _scan_range(task, codes=False):
    """(characters, with codes=True also the distinct code points, for a char vocabulary) of a byte range."""
    path, start, stop = task
    data = _read(path, start, stop)
    count = int(np.count_nonzero(_char_starts(data)))
    if not codes:  # gpt2 needs only the count; the encoding pass checks the decoding
        return count, None
    text = _read_text(path, start, stop, data)
    present = np.zeros(0x110000, dtype=bool)
    present[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)] = True
    return count, np.flatnonzero(present).astype(np.uint32)


def _worker_init(load, parent):
    """A worker leaves Ctrl-C to the main process (which ends the pool with SIGTERM, at its default: the pool is made
    with forking_children) and, on Linux, dies with it: a main process that is killed leaves no worker
    printing a BrokenPipeError traceback, or waiting for tasks forever (one killed between the fork and the prctl is
    found by its parent's pid: the worker then ends itself)."""
    child_signals()
    system.die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    if load is not None:
        _init(*load)


def _encode_range(task):
    return _encoder.encode(_read_text(*task))


def _encode_documents(task):
    docs, open_last = task
    return _encoder.encode_documents(docs, open_last=open_last)


class _Workers:
    """Tasks run in order on num_proc processes (or here when num_proc=1), at most a few per process in flight, so
    memory stays bounded; results come back in submission order, so the output does not depend on num_proc."""

    def __init__(self, num_proc, kind=None, vocabulary=None):
        self.pool = None
        fork = system.forks()
        if num_proc == 1 or fork:
            _init(kind, vocabulary)  # forked workers inherit the loaded tokenizer instead of each loading it again
        if num_proc > 1:
            with forking_children():
                self.pool = system.child_context().Pool(
                    num_proc, initializer=_worker_init, initargs=(None if fork else (kind, vocabulary), os.getpid()))
        self.limit = 4 * num_proc  # enough queued that no worker waits for the next chunk

    def map(self, fn, tasks):
        """(task, fn(task)) for each task, in order."""
        if self.pool is None:
            yield from ((task, fn(task)) for task in tasks)
            return
        pending = collections.deque()
        for task in tasks:
            pending.append((task, self.pool.apply_async(fn, (task,))))
            while len(pending) >= self.limit:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _safe_cut(text, start):
    """The first index i >= start where GPT-2's pre-tokenizer splits text anyway (None if there is none): before a
    space that follows a letter or digit and precedes a letter, or after a newline between two non-space characters."""
    for i in range(max(start, 2), len(text) - 1):
        c = text[i]
        if c == " " and text[i - 1].isalnum() and text[i + 1].isalpha():
            return i
        if text[i - 1] == "\n" and not c.isspace() and not text[i - 2].isspace():
            return i
    return None


# ----------------------------------------------------------------------------- the whole preparation

@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer a dataset is prepared with: kind char, gpt2 or bpe (a byte-level BPE of vocab_size ids trained
    on at most bpe_sample_mb of the train split, never on val); or, for chat data, the tokenizer of the model in
    of_model (a run's out_dir, a transformers directory, a prepared dataset) with kind None."""
    kind: str | None = "char"
    vocab_size: int | None = None
    bpe_sample_mb: float = BPE_SAMPLE_MB
    of_model: str | None = None

    @classmethod
    def of(cls, tokenizer):
        """A TokenizerChoice as it is, or one of a kind's name ("char", "gpt2")."""
        return tokenizer if isinstance(tokenizer, cls) else cls(tokenizer)


def prepare_dataset(source, out_dir, tokenizer="char", *, val_fraction=0.1, num_proc=None, progress=True, report=print):
    """Tokenize a TextSource or DocumentSource and write train.bin, val.bin and the vocabulary into out_dir, replacing
    what was there only once everything is written. tokenizer: a TokenizerChoice, or the name of a kind. report(line)
    says what the BPE was trained on. Returns {"train": tokens, "val": tokens, "vocab_size": n, "text_bytes": {split:
    bytes}}."""
    from tqdm import tqdm

    choice = TokenizerChoice.of(tokenizer)
    tokenizer, vocab_size, bpe_sample_mb = choice.kind, choice.vocab_size, choice.bpe_sample_mb

    check_tokenizer_settings(tokenizer, vocab_size, bpe_sample_mb)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    num_proc = min(num_proc or os.cpu_count() or 1, os.cpu_count() or 1)
    documents = isinstance(source, DocumentSource)
    if documents and source.count < 2:
        raise UserError(f"input '{source.path}' holds {source.count} document: train and val need at least two")
    out_dir = Path(out_dir)
    train_bytes = int(source.text_bytes() * (1 - val_fraction)) if documents else None  # where the stream is cut
    passes = 2 if tokenizer == "char" or not documents else 1
    with owned_dataset_dir(out_dir), tqdm(total=passes * source.size, unit="B", unit_scale=True,
                                          desc=f"prepare {out_dir.name}", mininterval=0.5, disable=not progress) as bar:
        if documents:
            vocabulary = _vocabulary(source, bar.update) if tokenizer == "char" else None
        else:
            vocabulary, split = _scan(source, tokenizer, val_fraction, num_proc, bar.update)
        if tokenizer == "bpe":
            bar.clear()
            vocabulary = _train_bpe(source, split if not documents else train_bytes, vocab_size, bpe_sample_mb, report)
        counts, said = {}, []  # said once the bar is closed: a line printed beside a live bar is drawn over

        def write_all(files):
            bins = {s: files[out_dir / f"{s}.bin"] for s in ("train", "val")}
            t0 = time.perf_counter()
            with _Workers(num_proc, tokenizer, vocabulary) as workers:
                if documents:
                    counts.update(_write_documents(source, bins, workers, train_bytes, bar.update))
                else:
                    cut = _char_start if tokenizer == "char" else _bpe_cut
                    for s, (a, b) in (("train", (0, split)), ("val", (split, source.size))):
                        results = workers.map(_encode_range, _ranges(source.path, a, b, cut))
                        counts[s] = _write_ids(results, bins[s], lambda task: bar.update(task[2] - task[1]))
            if counts["train"] < 2 or counts["val"] < 2:
                raise UserError("text is too short to split into train and val: give a longer file")
            seconds = time.perf_counter() - t0
            said.append(f"encoded {source.size / 1e6:,.1f} MB on {num_proc} process(es) in {seconds:.1f} s "
                        f"({source.size / 1e6 / seconds:,.1f} MB/s)")
            if tokenizer == "char":  # nanoGPT's meta.pkl, so its scripts read our data too
                files[out_dir / "meta.pkl"].write(pickle.dumps({"vocab_size": len(vocabulary), "itos": dict(
                    enumerate(vocabulary)), "stoi": {c: i for i, c in enumerate(vocabulary)}}))
            if tokenizer == "bpe":
                files[out_dir / BPE_FILE].write(vocabulary.encode("utf-8"))
            write_meta(files, out_dir, dataset_meta(tokenizer, vocabulary))

        commit_dataset(out_dir, {"char": ["meta.pkl"], "gpt2": [], "bpe": [BPE_FILE]}[tokenizer], write_all)
    for line in said:
        report(line)
    meta = dataset_meta(tokenizer, vocabulary)
    return {"train": counts["train"], "val": counts["val"], "vocab_size": meta["vocab_size"]}


def check_tokenizer_settings(tokenizer, vocab_size, bpe_sample_mb):
    """One line for a tokenizer setting that cannot work, before any input is read."""
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer '{tokenizer}': use char, gpt2 or bpe")
    if tokenizer != "bpe":
        if vocab_size is not None:
            raise UserError(f"--vocab_size is for --tokenizer=bpe ({tokenizer}'s vocabulary is fixed by its text or by "
                            f"GPT-2)")
        return
    if vocab_size is None:
        raise UserError("--tokenizer=bpe needs --vocab_size=N: the ids to learn, e.g. 1024 (see README, your own corpus)")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab_size={vocab_size} must be from {MIN_VOCAB} (the 256 bytes and <|endoftext|>) to "
                        f"{MAX_VOCAB:,} (ids are stored as uint16 in train.bin and val.bin)")
    if not 0 < bpe_sample_mb < float("inf"):  # nan fails this too
        raise UserError(f"--bpe_sample_mb={bpe_sample_mb} must be a positive number of megabytes")


def dataset_meta(tokenizer, vocabulary):
    """meta.json's description of the vocabulary (before its list of files)."""
    if tokenizer == "char":
        return {"tokenizer": "char", "vocab_size": len(vocabulary), "itos": vocabulary}
    if tokenizer == "gpt2":
        return {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT}
    enc = tiktoken_encoding(vocabulary)
    return {"tokenizer": "bpe", "vocab_size": enc.max_token_value + 1, "eot_token": enc.encode_single_token(EOT),
            "tokenizer_file": BPE_FILE}


def _train_bpe(source, train_end, vocab_size, sample_mb, report):
    """tokenizer.json of a BPE trained on (a sample of) the train split: the first train_end bytes of a text file or
    of the documents' text. Reports the sample and the vocabulary it gave."""
    limit = int(sample_mb * 2**20)
    train_bytes = train_end
    if isinstance(source, DocumentSource):
        sample, sampled = _document_sample(source, train_end, limit)
    else:
        sample, sampled = _text_sample(source.path, train_end, limit)
    if train_bytes == 0 or not sample:
        raise UserError("the train split is empty: nothing to train a BPE on (give more text, or a smaller "
                        "--val_fraction)")
    t0 = time.perf_counter()
    spec = train_bpe(sample, vocab_size)
    got = tiktoken_encoding(spec).max_token_value + 1
    share = "all of the train split" if train_bytes <= limit else (f"a sample of {sampled / 2**20:,.1f} MB of its "
                                                                    f"{train_bytes / 2**20:,.1f} MB (--bpe_sample_mb)")
    report(f"trained a byte-level BPE of {got:,} tokens on {share} in {time.perf_counter() - t0:.1f} s")
    if got < vocab_size:
        report(f"note: the train text holds pairs for only {got:,} tokens, fewer than the {vocab_size:,} asked for: the "
               f"vocabulary is {got:,}")
    return spec


def _text_sample(path, end, limit, pieces=64):
    """([texts], bytes) of the file's first `end` bytes: all of them up to `limit`, else `pieces` evenly spaced ranges
    that add up to about `limit` (cut at character starts)."""
    if end <= limit:
        return ([_read_text(path, 0, end)] if end else []), end
    texts, total, size = [], 0, limit // pieces
    with open(path, "rb") as f:
        for i in range(pieces):
            a = _char_start(f, (end - size) * i // (pieces - 1), end)
            b = _char_start(f, a + size, end)
            texts.append(_read_text(path, a, b))
            total += b - a
    return texts, total


def _document_sample(source, train_bytes, limit):
    """([texts], bytes) of the train split's documents (the first train_bytes of their text): every k-th of them, so
    about `limit` bytes spread over all."""
    every = max(1, -(-train_bytes // limit))
    texts, total = [], 0
    for i, (train, _) in enumerate(_cut_documents(source.documents(lambda n: None), train_bytes)):
        if train is None:
            break
        if i % every == 0:
            texts.append(train)
            total += len(train.encode("utf-8"))
    return texts, total


def _cut_documents(docs, train_bytes):
    """(train text, val text) for each document: one of the two None but at the cut, the document where the first
    train_bytes of the text end, split at the character there."""
    seen = 0
    for doc in docs:
        size = len(doc.encode("utf-8")) if not doc.isascii() else len(doc)
        if seen >= train_bytes:
            yield None, doc
        elif seen + size <= train_bytes:
            yield doc, None
        else:
            head = doc.encode("utf-8")[:train_bytes - seen].decode("utf-8", errors="ignore")
            yield head, doc[len(head):]
        seen += size


@contextlib.contextmanager
def owned_dataset_dir(out_dir):
    """Hold a dataset directory while it is prepared: create it (a one-line error where that is impossible), take its
    lock (a second preparation of the same name is refused, naming the first), and remove the temp files of
    preparations that died. A directory this call created is removed again if the preparation fails."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the dataset directory {out_dir} ({e.strerror or e}): choose another "
                        f"--data_dir (or --out_dir)") from None
    lock = DirectoryLock(out_dir, what="dataset directory", fix="or prepare it under another --name").acquire()
    try:
        remove_stale_temps(out_dir)
        yield out_dir
    except BaseException:
        lock.release()
        if created and all(p.name == LOCK_NAME for p in out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    lock.release()


def commit_dataset(out_dir, extra, write_all):
    """Write a dataset's files with write_all({path: file}) (it must call write_meta last), then switch them into
    place together: train.bin, val.bin and `extra` first, meta.json, which lists the others' sizes and fingerprints,
    last. Files of another tokenizer's dataset that `extra` does not name (a char set's meta.pkl) go. A reader
    (Dataset) checks the list, so a kill between two renames is caught, never trained on."""
    stale = [out_dir / n for n in DATASET_EXTRAS if n not in extra and (out_dir / n).exists()]
    names = ["train.bin", "val.bin", *extra, "meta.json"]
    try:
        replace_together([out_dir / n for n in names], write_all, remove=stale)
    except OSError as e:
        raise UserError(f"cannot write dataset files in {out_dir}: {e.strerror or e}; the dataset there is as it "
                        f"was") from None


def write_meta(files, out_dir, meta):
    """meta.json with the list of the dataset's files (size and fingerprint of each, as written)."""
    listed = {}
    for path, f in files.items():
        if path.name != "meta.json":
            f.flush()
            listed[path.name] = {"bytes": os.path.getsize(f.name), "fingerprint": fingerprint(f.name)}
    meta = {**meta, "files": listed}
    files[out_dir / "meta.json"].write(json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def _scan(source, tokenizer, val_fraction, num_proc, progress):
    """The first pass over a text file, on the workers: (the char vocabulary or None, the byte offset where val
    starts: after the first (1 - val_fraction) of the characters)."""
    ranges = list(_ranges(source.path, 0, source.size, _char_start))
    counts, present = [], np.zeros(0x110000, dtype=bool)
    with _Workers(num_proc) as workers:
        for task, (count, codes) in workers.map(functools.partial(_scan_range, codes=tokenizer == "char"), ranges):
            counts.append(count)
            if codes is not None:
                present[codes] = True
            progress(task[2] - task[1])
    itos = None
    if tokenizer == "char":
        itos = _itos(present)
    k = int(sum(counts) * (1 - val_fraction))
    for (path, a, b), n in zip(ranges, counts):
        if k < n:  # the k-th character of this range
            return itos, a + int(np.flatnonzero(_char_starts(_read(path, a, b)))[k])
        k -= n
    return itos, source.size


def _itos(present):
    """The sorted characters marked in a table of every Unicode code point; a UserError past uint16's ids."""
    seen = np.flatnonzero(present)
    if len(seen) > 65535:
        raise UserError(f"text has {len(seen)} distinct characters; uint16 ids allow 65535: use --tokenizer=gpt2")
    return [chr(c) for c in seen.tolist()]


def _vocabulary(source, progress):
    """The sorted distinct characters of a DocumentSource (with the separators), in one pass: each document's code
    points marked in a table of every Unicode code point (a vectorised scatter, no sorting)."""
    present = np.zeros(0x110000, dtype=bool)
    for doc in source.documents(progress):
        present[np.frombuffer((doc + DOC_SEPARATOR).encode("utf-32-le"), dtype=np.uint32)] = True
    return _itos(present)


def _write_ids(results, f, done=None):
    """Write the (task, ids) results to f in order; done(task) after each. Returns the number of tokens."""
    written = 0
    for task, ids in results:
        f.write(ids)
        written += len(ids) // 2
        if done is not None:
            done(task)
    return written


def _write_documents(source, bins, workers, train_bytes, progress):
    """Documents in batches of about CHUNK_CHARS characters: the first train_bytes of their text into train.bin, the
    rest into val.bin. The document at the cut ends train without a separator (it goes on in val), as a text file's
    cut does."""
    counts = {}
    cut = _cut_documents(source.documents(progress), train_bytes)
    carry = []

    def batches(split):
        nonlocal carry
        batch, size, carry = carry, sum(map(len, carry)), []
        for train, val in cut:
            if split == "train" and train is None:  # the cut fell between two documents
                carry = [val]
                break
            if split == "train" and val is not None:  # the document at the cut: its head ends train
                carry = [val]
                yield batch + [train], True
                return
            batch.append(train if split == "train" else val)
            size += len(batch[-1])
            if size >= CHUNK_CHARS:
                yield batch, False
                batch, size = [], 0
        if batch:
            yield batch, False

    for split in ("train", "val"):
        counts[split] = _write_ids(workers.map(_encode_documents, batches(split)), bins[split])
    return counts


# ----------------------------------------------------------------------------- the scripts

def write_token_stream(chunks, path):
    """Write uint16 id arrays one after another into path (whole or not at all), for corpora too big to hold in
    memory. Returns the number of tokens written."""
    total = 0

    def write(f):
        nonlocal total
        for ids in chunks:
            ids = np.asarray(ids)
            if ids.size and (ids.min() < 0 or ids.max() > 65535):
                raise UserError(f"token id {int(ids.max())} does not fit in uint16: this tokenizer needs a wider format")
            f.write(ids.astype(np.uint16).tobytes())
            total += ids.size
    atomic_write(path, write)
    return total


def prepare_main(argv, description, here, tokenizer):
    """Command line shared by the data/*/prepare.py scripts: input.txt beside the script, else
    --input PATH, else download tiny-shakespeare."""
    from gpt_toolkit.core.cli import ToolParser

    parser = ToolParser(description, prog=f"{Path(here).name}/prepare.py")
    parser.add_argument("--input", help="any UTF-8 text file (default: input.txt beside this script, downloaded if missing)")
    parser.add_argument("--out_dir", default=str(here), help="where train.bin, val.bin and meta go (default: beside this script)")
    parser.add_argument("--url", default=TINY_SHAKESPEARE_URL, help="where to download the text from when there is no input file")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction of the text kept for validation (default 0.1)")
    parser.add_argument("--num_proc", type=int, default=0, help="tokenizer processes (default: one per core)")
    if tokenizer is None:
        parser.add_argument("--tokenizer", choices=["char", "gpt2"], default="char")
    args, _ = parser.parse(argv)
    if args.input:
        source = Path(args.input)
    else:
        source = Path(here) / "input.txt"
        if not source.exists():
            print(f"downloading {args.url} to {source}")
            download(args.url, source)
    text = open_source(source)
    print(f"read {source}: {text.size:,} bytes")
    summary = prepare_dataset(text, args.out_dir, tokenizer or args.tokenizer, val_fraction=args.val_fraction,
                              num_proc=args.num_proc or None)
    print(f"vocab size {summary['vocab_size']:,}; train has {summary['train']:,} tokens, val has {summary['val']:,} tokens")
    print(f"wrote {Path(args.out_dir) / 'train.bin'}, val.bin and the vocabulary")
    return 0
