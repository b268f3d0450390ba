"""Preparing a dataset from text, streamed: a text file, a directory of text files or a JSON Lines export, read and
tokenized in chunks on every core (worker processes) and written to train.bin/val.bin and the vocabulary files, all
together or not at all. Memory stays bounded by the chunks in flight, whatever the size of the input.

Splits. A single text (file or string): its first (1 - val_fraction) of the characters are train, the rest val,
as nanoGPT's shakespeare scripts cut it (a dataset prepared before comes out byte for byte the same). Documents
(a directory's files in sorted order, or JSONL lines): the last documents are val (at least one); gpt2 puts the
end-of-text token after each document (as data/openwebtext/prepare.py), char a blank line ("\\n\\n").
"""
import collections
import json
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np

from errors import UserError
from files import atomic_write, remove_stale_temps, replace_together
from tokenizer import GPT2_EOT, GPT2_VOCAB_SIZE, TINY_SHAKESPEARE_URL, GPT2Tokenizer, download

BLOCK_BYTES = 4 << 20  # read this much of a file at a time
CHUNK_CHARS = 1 << 20  # tokenize about this many characters per task
MAX_CARRY = 16 * CHUNK_CHARS  # text without a safe BPE cut point is cut here anyway (see _bpe_chunks)
DOC_SEPARATOR = "\n\n"  # between character-level documents


# ----------------------------------------------------------------------------- sources

class TextSource:
    """One text: a file read in blocks (decoded strictly, so a byte that is not UTF-8 is named with its offset) or a
    string already in memory."""

    def __init__(self, path=None, text=None):
        self.path, self.text = (Path(path) if path else None), text
        if path is not None:
            try:
                self.size = self.path.stat().st_size
            except FileNotFoundError:
                raise UserError(f"input file '{path}' not found: check the path") from None
        else:
            self.size = len(text.encode("utf-8"))
        if self.size == 0:
            raise UserError(f"input '{path or 'text'}' is empty: give a file with some text in it")

    def pieces(self, progress):
        """The text in pieces, in order; progress(n) with the bytes each piece came from."""
        if self.text is not None:
            for i in range(0, len(self.text), CHUNK_CHARS):
                piece = self.text[i:i + CHUNK_CHARS]
                progress(len(piece.encode("utf-8")))
                yield piece
            return
        yield from _decoded_blocks(self.path, progress)

    def char_count(self, progress):
        """Characters in the text: bytes that do not continue a UTF-8 sequence (no decoding needed)."""
        if self.text is not None:
            progress(self.size)
            return len(self.text)
        count = 0
        with open(self.path, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                raw = np.frombuffer(block, dtype=np.uint8)
                count += int(np.count_nonzero((raw & 0xC0) != 0x80))
                progress(len(block))
        return count


def _decoded_blocks(path, progress, what="input file"):
    """A UTF-8 file as strings, block by block; a block ends before any UTF-8 sequence it would cut."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            data = carry + block
            if not data:
                return
            cut = len(data)
            if block:  # more to come: end this block before a character that is not complete yet
                i = len(data) - 1
                while i > 0 and len(data) - i < 4 and (data[i] & 0xC0) == 0x80:
                    i -= 1
                lead = data[i]
                if lead >= 0xC0 and len(data) - i < (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4):
                    cut = i
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {offset + e.start}): "
                                f"convert it to UTF-8") from None
            progress(len(block))
            offset += cut
            carry = data[cut:]
            if text:
                yield text
            if not block:
                if carry:
                    raise UserError(f"{what} '{path}' is not UTF-8 text (it ends inside a character, at byte "
                                    f"{offset}): convert it to UTF-8")
                return


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
                if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
                    raise UserError(f"{where} has no text field '{self.text_field}': pass --text_field=NAME, the key "
                                    f"that holds each document's text")
                yield record[self.text_field]


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


def _init(kind, itos):
    global _encoder
    _encoder = _CharEncoder(itos) if kind == "char" else _GPT2Encoder()


class _CharEncoder:
    def __init__(self, itos):
        codes = np.array([ord(c) for c in itos], dtype=np.int64)
        self.lut = np.zeros(int(codes.max()) + 1, dtype=np.uint16)
        self.lut[codes] = np.arange(len(itos), dtype=np.uint16)

    def encode(self, text):
        ids = self.lut[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
        return ids.tobytes()

    def encode_documents(self, docs):
        return self.encode("".join(d + DOC_SEPARATOR for d in docs))


class _GPT2Encoder:
    def __init__(self):
        self.enc = GPT2Tokenizer()

    def encode(self, text):
        return np.array(self.enc.encode(text), dtype=np.uint16).tobytes()  # a literal <|endoftext|> separates documents

    def encode_documents(self, docs):
        ids = []
        for doc in docs:
            ids.extend(self.enc.encode_ordinary(doc))
            ids.append(GPT2_EOT)
        return np.array(ids, dtype=np.uint16).tobytes()


def _encode_text(text):
    return _encoder.encode(text)


def _encode_documents(docs):
    return _encoder.encode_documents(docs)


class _Workers:
    """Tasks run in order on num_proc processes (or here when num_proc=1), at most a few per process in flight, so
    memory stays bounded; results come back in submission order, so the output does not depend on num_proc."""

    def __init__(self, num_proc, kind, itos):
        self.pool = None
        fork = os.name == "posix"
        if num_proc == 1 or fork:
            _init(kind, itos)  # forked workers inherit the loaded tokenizer instead of each loading it again
        if num_proc > 1:
            self.pool = multiprocessing.get_context("fork" if fork else "spawn").Pool(
                num_proc, initializer=None if fork else _init, initargs=() if fork else (kind, itos))
        self.limit = 4 * num_proc  # enough queued that no worker waits for the next chunk
        self.pending = collections.deque()

    def submit(self, fn, arg):
        """Queue fn(arg); yields the results that are due, in order."""
        if self.pool is None:
            yield fn(arg)
            return
        self.pending.append(self.pool.apply_async(fn, (arg,)))
        while len(self.pending) >= self.limit:
            yield self.pending.popleft().get()

    def drain(self):
        while self.pending:
            yield self.pending.popleft().get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _bpe_chunks(pieces):
    """Re-cut a stream of text pieces into chunks of about CHUNK_CHARS that GPT-2's pre-tokenizer would split at
    anyway, so that encoding the chunks one by one gives the tokens of the whole: before a space that follows a
    letter or digit and precedes a letter, or after a newline between two non-space characters. Text with no such
    point for MAX_CARRY characters is cut there anyway (a boundary that may differ from encoding the whole)."""
    buf = ""
    for piece in pieces:
        buf += piece
        while len(buf) > CHUNK_CHARS:
            cut = _safe_cut(buf, CHUNK_CHARS)
            if cut is None:
                if len(buf) < MAX_CARRY:
                    break
                cut = MAX_CARRY
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _safe_cut(text, start):
    for i in range(start, len(text) - 1):
        c = text[i]
        if c == " " and text[i - 1].isalnum() and text[i + 1].isalpha():
            return i
        if text[i - 1] == "\n" and not c.isspace() and i >= 2 and not text[i - 2].isspace():
            return i
    return None


def _split_at(pieces, cut):
    """Two streams from one: the first `cut` characters, then the rest (the second read only after the first)."""
    pieces = iter(pieces)
    rest = []

    def head():
        seen = 0
        for piece in pieces:
            if seen + len(piece) <= cut:
                seen += len(piece)
                yield piece
                continue
            yield piece[:cut - seen]
            rest.append(piece[cut - seen:])
            return

    def tail():
        yield from rest
        yield from pieces

    return head(), tail()


# ----------------------------------------------------------------------------- the whole preparation

def prepare_dataset(source, out_dir, tokenizer="char", *, val_fraction=0.1, num_proc=None, progress=True):
    """Tokenize a TextSource or DocumentSource and write train.bin, val.bin and the vocabulary into out_dir, replacing
    what was there only once everything is written. Returns {"train": tokens, "val": tokens, "vocab_size": n}."""
    from tqdm import tqdm

    if tokenizer not in ("char", "gpt2"):
        raise UserError(f"unknown tokenizer '{tokenizer}': use char or gpt2")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    num_proc = num_proc or os.cpu_count() or 1
    documents = isinstance(source, DocumentSource)
    if documents and source.count < 2:
        raise UserError(f"input '{source.path}' holds {source.count} document: train and val need at least two")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    passes = 2 if tokenizer == "char" or not documents else 1
    with tqdm(total=passes * source.size, unit="B", unit_scale=True, desc=f"prepare {out_dir.name}", mininterval=0.5,
              disable=not progress) as bar:
        itos, chars = None, None
        if tokenizer == "char":
            itos, chars = _vocabulary(source, bar.update)
        elif not documents:
            chars = source.char_count(bar.update)
        workers = _Workers(min(num_proc, os.cpu_count() or 1), tokenizer, itos)
        try:
            counts = {}

            def write_all(files):
                if documents:
                    n_val = max(1, round(source.count * val_fraction))
                    bins = {split: files[out_dir / f"{split}.bin"] for split in ("train", "val")}
                    counts.update(_write_documents(source, bins, workers, source.count - n_val, bar.update))
                else:
                    train, val = _split_at(source.pieces(bar.update), int(chars * (1 - val_fraction)))
                    for split, stream in (("train", train), ("val", val)):
                        chunks = _bpe_chunks(stream) if tokenizer == "gpt2" else stream
                        counts[split] = _write_chunks(chunks, _encode_text, files[out_dir / f"{split}.bin"], workers)
                if counts["train"] < 2 or counts["val"] < 2:
                    raise UserError("text is too short to split into train and val: give a longer file")
                meta = ({"tokenizer": "char", "vocab_size": len(itos), "itos": itos} if tokenizer == "char" else
                        {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT})
                files[out_dir / "meta.json"].write(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                if tokenizer == "char":  # nanoGPT's meta.pkl, so its scripts read our data too
                    files[out_dir / "meta.pkl"].write(pickle.dumps(
                        {"vocab_size": len(itos), "itos": dict(enumerate(itos)), "stoi": {c: i for i, c in enumerate(itos)}}))

            names = ["train.bin", "val.bin", "meta.json"] + (["meta.pkl"] if tokenizer == "char" else [])
            try:
                replace_together([out_dir / n for n in names], write_all)
            except OSError as e:
                raise UserError(f"cannot write dataset files in {out_dir}: {e.strerror}; the dataset there is as it "
                                f"was") from None
        finally:
            workers.close()
    return {"train": counts["train"], "val": counts["val"], "vocab_size": len(itos) if itos else GPT2_VOCAB_SIZE}


def _vocabulary(source, progress):
    """(sorted distinct characters, character count) in one pass: each piece's code points marked in a table of
    every Unicode code point (a vectorised scatter, no sorting)."""
    present, count = np.zeros(0x110000, dtype=bool), 0
    stream = source.pieces(progress) if isinstance(source, TextSource) else _with_separators(source.documents(progress))
    for piece in stream:
        codes = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
        present[codes] = True
        count += len(codes)
    seen = np.flatnonzero(present)
    if len(seen) > 65535:
        raise UserError(f"text has {len(seen)} distinct characters; uint16 ids allow 65535: use --tokenizer=gpt2")
    return [chr(c) for c in seen.tolist()], count


def _with_separators(docs):
    for doc in docs:
        yield doc + DOC_SEPARATOR


def _write_chunks(chunks, fn, f, workers):
    """Encode chunks on the workers and write their ids to f in order. Returns the number of tokens."""
    written = 0
    for chunk in chunks:
        for ids in workers.submit(fn, chunk):
            f.write(ids)
            written += len(ids) // 2
    for ids in workers.drain():
        f.write(ids)
        written += len(ids) // 2
    return written


def _write_documents(source, bins, workers, n_train, progress):
    """Documents in batches of about CHUNK_CHARS characters: the first n_train into train.bin, the rest val.bin."""
    counts = {}
    docs = iter(enumerate(source.documents(progress)))
    pending = None
    for split, end in (("train", n_train), ("val", source.count)):
        def batches(end=end):
            nonlocal pending
            batch, size = [], 0
            while True:
                item = pending if pending is not None else next(docs, None)
                pending = None
                if item is None or item[0] >= end:
                    pending = item
                    break
                batch.append(item[1])
                size += len(item[1])
                if size >= CHUNK_CHARS:
                    yield batch
                    batch, size = [], 0
            if batch:
                yield batch
        counts[split] = _write_chunks(batches(), _encode_documents, bins[split], workers)
    return counts


# ----------------------------------------------------------------------------- in-memory text and the scripts

def build_dataset(text, out_dir, tokenizer="char", val_fraction=0.1, progress=True, num_proc=1):
    """prepare_dataset of a string (tests, small texts)."""
    if not text:
        raise UserError("input text is empty: give a file with some text in it")
    return prepare_dataset(TextSource(text=text), out_dir, tokenizer, val_fraction=val_fraction, num_proc=num_proc,
                           progress=progress)


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
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", help="any UTF-8 text file (default: input.txt beside this script, downloaded if missing)")
    parser.add_argument("--out_dir", default=str(here), help="where train.bin, val.bin and meta go (default: beside this script)")
    parser.add_argument("--url", default=TINY_SHAKESPEARE_URL, help="where to download the text from when there is no input file")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction of the text kept for validation (default 0.1)")
    parser.add_argument("--num_proc", type=int, default=0, help="tokenizer processes (default: one per core)")
    if tokenizer is None:
        parser.add_argument("--tokenizer", choices=["char", "gpt2"], default="char")
    args = parser.parse_args(argv)
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
