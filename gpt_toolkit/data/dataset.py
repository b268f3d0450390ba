"""Datasets on disk, their tokenizers, and the batches training draws from them.

A dataset is a directory data/<name>/ (nanoGPT's layout) holding
    train.bin, val.bin   token ids, uint16, end to end
    meta.json            the vocabulary: {"tokenizer": "char", "vocab_size": N, "itos": [...]},
                         {"tokenizer": "gpt2", "vocab_size": 50257} or {"tokenizer": "bpe", "vocab_size": N, ...}, and
                         the list of the dataset's files (sizes and fingerprints)
    tokenizer.json       bpe datasets only: the tokenizer (Hugging Face's format)
    meta.pkl             char datasets only: the same vocabulary as nanoGPT writes it
                         ({"vocab_size", "itos", "stoi"}), so nanoGPT's scripts read our data too.

Batches are a pure function of (seed, step): the rows of one optimizer step are drawn at once and
then split into micro-batches (and across DDP ranks), so 64x1 and 16x4 train on the same rows and a
resumed run continues with the very batches an uninterrupted one would have seen.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import fingerprint
from gpt_toolkit.core.tokenizer import GPT2_EOT, read_meta
from model import GPT2_PADDED_VOCAB

SPLITS = ("train", "val")
TOOLKIT_DATA = Path(__file__).resolve().parents[2] / "data"


def open_split(path):
    """A split's token ids as a read-only memmap, opened once per run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file (a directory?): move it away and re-run the prepare script")
    size = path.stat().st_size
    if size % 2:
        raise UserError(f"{path} has an odd byte count ({size}), so it is not whole uint16 ids (truncated?): "
                        f"re-run the prepare script")
    if size == 0:
        raise UserError(f"{path} is empty: re-run the prepare script")
    return np.memmap(path, dtype=np.uint16, mode="r")


class Dataset:
    """The train/val token streams and vocabulary of data/<name>, checked on open. max_train_tokens > 0
    keeps only the start of the train split (a data-limited run)."""

    def __init__(self, data_dir, name, max_train_tokens=0):
        self.name = name
        self.path = Path(data_dir) / name
        self.prepare_hint = self._prepare_hint()
        missing = [s for s in SPLITS if not (self.path / f"{s}.bin").exists()]
        if missing:
            raise UserError(f"dataset '{name}' is not prepared ({self.path / (missing[0] + '.bin')} is missing): "
                            f"run {self.prepare_hint} first")
        self.meta = read_meta(self.path)
        self.splits = {s: open_split(self.path / f"{s}.bin") for s in SPLITS}
        self._check_files()
        self.trained = {s: None for s in SPLITS}  # chat datasets: which targets training learns (1) or skips (0)
        if self.is_chat:
            for s in SPLITS:
                self.trained[s] = np.memmap(self.path / f"{s}.mask.bin", dtype=np.uint8, mode="r")
                if len(self.trained[s]) != len(self.splits[s]):
                    raise UserError(f"{self.path / (s + '.mask.bin')} does not match {s}.bin: re-run {self.prepare_hint}")
        self.limited = bool(max_train_tokens)
        if max_train_tokens:
            self.splits["train"] = self.splits["train"][:max_train_tokens]
            if self.trained["train"] is not None:
                self.trained["train"] = self.trained["train"][:max_train_tokens]
        self._documents = {}

    def _check_files(self):
        """The files are the ones meta.json lists (datasets prepared by this toolkit; nanoGPT's have no list): a
        preparation killed between two renames, or a file replaced by hand, is refused instead of trained on."""
        listed = (self.meta or {}).get("files")
        if not isinstance(listed, dict):
            return
        for name, expected in listed.items():
            path = self.path / name
            actual = {"bytes": path.stat().st_size, "fingerprint": fingerprint(path)} if path.exists() else None
            if actual is None or actual["bytes"] != expected.get("bytes") or actual["fingerprint"] != expected.get(
                    "fingerprint"):
                what = "is missing" if actual is None else "is not the file meta.json lists"
                raise UserError(f"dataset '{self.name}': {path} {what} (a preparation was interrupted, or files were "
                                f"replaced by hand): re-run {self.prepare_hint}")

    def _prepare_hint(self):
        """The command that makes this dataset: its own prepare.py, or the toolkit's one of that name."""
        if (self.path / "prepare.py").exists():
            return f"python {self.path / 'prepare.py'}"
        if (TOOLKIT_DATA / self.name / "prepare.py").exists():
            return f"python data/{self.name}/prepare.py --out_dir={self.path}"
        return f"python data/prepare_text.py --input=YOUR.txt --name={self.name}"

    @property
    def eot_token(self):
        """The end-of-text id that separates documents: <|endoftext|> of GPT-2, of an own BPE or of a chat vocabulary
        (it ends each conversation); None for characters."""
        if self.meta is None or self.meta["tokenizer"] in ("gpt2", "bpe") or self.meta.get("chat"):
            return (self.meta or {}).get("eot_token", GPT2_EOT)
        return None

    @property
    def is_chat(self):
        """A conversations dataset (data/prepare_chat.py): its targets are masked to the assistant's tokens."""
        return bool((self.meta or {}).get("chat"))

    @property
    def vocabulary(self):
        """meta.json's description of the vocabulary (what a checkpoint stores), without its list of files; or None."""
        return None if self.meta is None else {k: v for k, v in self.meta.items() if k != "files"}

    @property
    def vocab_size(self):
        """From the vocabulary file, or None when there is none."""
        return self.meta["vocab_size"] if self.meta else None

    @property
    def model_vocab_size(self):
        """The vocab_size a new model for this data gets: the vocabulary's, or without a vocabulary file GPT-2's
        50257 padded to 50304 (nanoGPT's convention)."""
        return self.vocab_size or GPT2_PADDED_VOCAB

    def documents(self, split, block_size):
        """document_segments of a split (computed once per split and block size): what padded batches draw."""
        key = (split, block_size)
        if key not in self._documents:
            if self.eot_token is None:
                raise UserError(f"dataset '{self.name}' has no end-of-text token between documents")
            self._documents[key] = document_segments(self.splits[split], self.eot_token, block_size)
            if not len(self._documents[key][0]):
                raise UserError(f"the {split} split of '{self.name}' has no document of two tokens or more")
        return self._documents[key]

    def check_block_size(self, block_size):
        for split, data in self.splits.items():
            if len(data) <= block_size:
                fixes = [f"--block_size={len(data) - 1} or less"] * (len(data) > 1) + [
                    "a larger --max_train_tokens"] * (split == "train" and self.limited)
                fix = f"use {', or '.join(fixes)}" if fixes else "prepare more text"
                raise UserError(f"block_size={block_size} is too long for the {split} split of '{self.name}' "
                                f"({len(data)} token{'s' if len(data) != 1 else ''}): {fix}")

    def check_token_ids(self, vocab_size, max_scan=100_000_000):
        """Fail early if a split holds ids the model cannot embed (the wrong meta, or a corrupt file).
        Huge splits are checked batch by batch instead (see batch_at)."""
        for split, data in self.splits.items():
            if len(data) > max_scan:
                continue
            top = int(data.max())
            if top >= vocab_size:
                raise UserError(f"{split}.bin of '{self.name}' holds token id {top} but vocab_size is {vocab_size}: "
                                f"the .bin files do not match the vocabulary; re-run {self.prepare_hint}")


def _rng(*key):
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def train_offsets(*, seed, step, count, split_len, block_size):
    """Start positions of the `count` rows of optimizer step `step`: depends only on (seed, step)."""
    return _rng(seed, 0, step).integers(0, split_len - block_size, size=count)


def eval_offsets(*, seed, split, count, split_len, block_size):
    """A fixed set of rows per split, the same at every eval and in every run with this seed."""
    return _rng(seed, 1, SPLITS.index(split)).integers(0, split_len - block_size, size=count)


def batch_at(data, offsets, *, block_size, device="cpu", vocab_size=None, trained=None):
    """Rows data[o : o+block_size] as inputs X and the same rows shifted by one as targets Y, int64 (B, T). With
    trained (a chat dataset's 0/1 per token), targets that are not trained are -1, which the loss ignores."""
    rows = data[offsets[:, None] + np.arange(block_size + 1)]
    _check_ids(rows, vocab_size)
    t = _to_device(torch.from_numpy(rows.astype(np.int64)), device)
    if trained is None:
        return t[:, :-1], t[:, 1:]
    keep = torch.from_numpy(trained[offsets[:, None] + np.arange(1, block_size + 1)].astype(bool))
    return t[:, :-1], torch.where(_to_device(keep, device), t[:, 1:], -1)


def document_segments(data, eot, block_size, chunk=1 << 26):
    """(starts, lengths) of the rows dynamic padding draws from: every document (its tokens and the end-of-text
    token after it; text after the last one is a document too), and documents longer than block_size + 1 tokens cut
    into pieces that start every block_size tokens, so each token is a target exactly once. The split is scanned in
    chunks: memory stays bounded by the number of documents."""
    n = len(data)
    ends = [np.flatnonzero(np.asarray(data[i:i + chunk]) == eot) + i for i in range(0, n, chunk)]
    ends = np.concatenate(ends).astype(np.int64)
    starts = np.concatenate(([0], ends + 1))
    lengths = np.concatenate((ends + 1, [n])) - starts
    keep = lengths >= 2  # a lone end-of-text token has nothing to predict from
    starts, lengths = starts[keep], lengths[keep]
    pieces = np.maximum(1, -(-(lengths - 1) // block_size))
    doc = np.repeat(np.arange(len(starts)), pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece number inside its document
    return starts[doc] + k * block_size, np.minimum(block_size + 1, lengths[doc] - k * block_size)


def padded_batch(data, starts, lengths, *, pad, device="cpu", vocab_size=None, trained=None):
    """One row per segment, padded on the right to the longest in the batch (not to block_size): X with the pad
    id, Y with -1, which the loss ignores (as are targets a chat dataset does not train). Causal attention never lets
    a real token see the padding after it."""
    width = int(lengths.max())
    idx = starts[:, None] + np.arange(width)
    valid = np.arange(width) < lengths[:, None]
    rows = np.where(valid, data[np.minimum(idx, len(data) - 1)].astype(np.int64), 0)
    _check_ids(rows, vocab_size)
    X = np.where(valid[:, :-1], rows[:, :-1], pad)
    targets = valid[:, 1:] if trained is None else valid[:, 1:] & trained[np.minimum(idx, len(data) - 1)][:, 1:].astype(bool)
    Y = np.where(targets, rows[:, 1:], -1)
    return _to_device(torch.from_numpy(X), device), _to_device(torch.from_numpy(Y), device)


def _check_ids(rows, vocab_size):
    if vocab_size is not None and rows.max() >= vocab_size:
        raise UserError(f"token id {int(rows.max())} in the data is >= vocab_size {vocab_size}: "
                        f"the .bin files do not match the vocabulary; re-run the dataset's prepare script")


def _to_device(t, device):
    if device != "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device) if device != "cpu" else t


@dataclass(frozen=True)
class BatchPlan:
    """How a run cuts a split into the micro-batches of each optimizer step, for this process: its Config keys
    (batch_size, block_size, gradient_accumulation_steps, seed, mask_prob, mask_token) and its place in the job
    (device, rank, world_size; vocab_size to check the ids against)."""
    batch_size: int
    block_size: int
    gradient_accumulation_steps: int = 1
    seed: int = 1337
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    vocab_size: int | None = None
    mask_prob: float = 0.0
    mask_token: int = -1

    @classmethod
    def of(cls, cfg, *, device="cpu", rank=0, world_size=1, vocab_size=None):
        """The plan of a run's config (an object with the Config keys) in process `rank` of world_size."""
        return cls(batch_size=cfg.batch_size, block_size=cfg.block_size,
                   gradient_accumulation_steps=cfg.gradient_accumulation_steps, seed=cfg.seed, device=device, rank=rank,
                   world_size=world_size, vocab_size=vocab_size, mask_prob=cfg.mask_prob, mask_token=cfg.mask_token)

    def step(self, dataset, split, step, *, padding=False):
        """This process's micro-batches of a Dataset's split for optimizer step `step` (padding: whole documents,
        each micro-batch padded to its longest, as --padding=True trains)."""
        segments = dataset.documents(split, self.block_size) if padding else None
        return self.rows(dataset.splits[split], step, segments=segments, pad=dataset.eot_token or 0,
                         trained=dataset.trained[split])

    def rows(self, data, step, *, segments=None, pad=0, trained=None):
        """This process's micro-batches [(X, Y), ...] of token array `data` for optimizer step `step`.

        All batch_size * gradient_accumulation_steps rows of the step are drawn at once from (seed, step), then cut
        into micro-batches and dealt to DDP ranks in order, so how a step is split never changes its rows. With
        segments (document_segments), the rows are whole documents, each micro-batch padded to its longest (pad: the
        id X is padded with). mask_prob > 0 replaces that fraction of the inputs X (never the targets Y) with
        mask_token, or with a random token when mask_token is -1 (BERT-style augmentation, tutorial's challenge 5).
        trained: a chat split's 0/1 per token (targets not trained are -1)."""
        accum, batch_size, vocab_size = self.gradient_accumulation_steps, self.batch_size, self.vocab_size
        split_len, span = (len(data), self.block_size) if segments is None else (len(segments[0]), 0)
        offsets = train_offsets(seed=self.seed, step=step, count=batch_size * accum, split_len=split_len, block_size=span)
        per_rank = accum // self.world_size
        mine = offsets.reshape(accum, batch_size)[self.rank * per_rank:(self.rank + 1) * per_rank]
        masking = self.mask_prob > 0
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 2, step, self.rank])) if masking else None
        if segments is not None:
            batches = [padded_batch(data, segments[0][rows], segments[1][rows], pad=pad, device=self.device,
                                    vocab_size=vocab_size, trained=trained) for rows in mine]
            return [(self._masked(X, rng) if masking else X, Y) for X, Y in batches]
        X, Y = batch_at(data, mine.reshape(-1), block_size=self.block_size, device=self.device, vocab_size=vocab_size,
                        trained=trained)
        if masking:
            X = self._masked(X, rng)
        return list(zip(X.split(batch_size), Y.split(batch_size)))

    def _masked(self, X, rng):
        X = X.clone()  # X and Y are views of one buffer: masking X in place would change Y
        masked = torch.from_numpy(rng.random(tuple(X.shape)) < self.mask_prob).to(X.device)
        if self.mask_token == -1:
            fill = torch.from_numpy(rng.integers(0, self.vocab_size, size=tuple(X.shape))).to(X.device)
            return torch.where(masked, fill, X)
        return X.masked_fill(masked, self.mask_token)
