"""How good a model is: the loss over a run's fixed evaluation batches (eval_losses, what train.py logs), the loss
and bits per byte over every token of a split (Scoring.score, what tools/evaluate.py reports), and what an evaluation
costs against a training step."""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.tokenizer import describe, same_vocabulary, strip_chat, tokenizer_from_meta
from gpt_toolkit.data.dataset import Dataset, batch_at, eval_offsets, padded_batch
from gpt_toolkit.models.source import model_from_checkpoint


def eval_to_step_ratio(cfg):
    """An evaluation's cost in training steps: 2 splits x eval_iters forward passes of batch_size rows, a forward a
    third of a training step's work, over gradient_accumulation_steps micro-batches per step."""
    return 2 * cfg.eval_iters / 3 / cfg.gradient_accumulation_steps


@torch.no_grad()
def eval_losses(model, dataset, cfg, *, device, ctx, vocab_size=None, progress=None, byte_lengths=None):
    """Mean loss over cfg.eval_iters fixed batches of cfg.batch_size rows per split ({'train': x, 'val': y}), model in
    eval mode; with cfg.padding, batches of whole documents as training draws them (with cfg.packing, attention
    stopping at each document's end). With byte_lengths (bytes per id), also the bits per byte of those batches
    ({'train_bpb': .., 'val_bpb': ..}). progress(split, batches done, eval_iters) after each batch."""
    eval_iters, batch_size, block_size, seed = cfg.eval_iters, cfg.batch_size, cfg.block_size, cfg.seed
    padding, doc_sep = cfg.padding, dataset.eot_token if cfg.packing else None
    was_training = model.training
    model.eval()
    out = {}
    lengths = None if byte_lengths is None else byte_lengths.to(device)
    for split, data in dataset.splits.items():
        segments = dataset.documents(split, block_size) if padding else None
        offsets = eval_offsets(seed=seed, split=split, count=eval_iters * batch_size,
                               split_len=len(data) if segments is None else len(segments[0]),
                               block_size=block_size if segments is None else 0)
        total = torch.zeros((), device=device)
        nats, n_bytes = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), device=device)
        for done, rows in enumerate(offsets.reshape(eval_iters, batch_size)):
            if segments is None:
                X, Y = batch_at(data, rows, block_size=block_size, device=device, vocab_size=vocab_size,
                                 trained=dataset.trained[split])
            else:
                X, Y = padded_batch(data, segments[0][rows], segments[1][rows], pad=dataset.eot_token, device=device,
                                    vocab_size=vocab_size, trained=dataset.trained[split])
            with ctx:
                _, loss = model(X, Y, doc_sep)
            total += loss.float()
            if lengths is not None:  # the batch's loss is a mean over its targets (padding's -1 left out)
                targets = Y >= 0
                nats += loss.double() * targets.sum()
                n_bytes += lengths[Y.clamp(min=0)][targets].sum()
            if progress is not None:
                progress(split, done + 1, eval_iters)
        out[split] = total.item() / eval_iters  # one host sync per split
        if lengths is not None:
            out[f"{split}_bpb"] = nats.item() / math.log(2) / max(n_bytes.item(), 1)
    model.train(was_training)
    return out


@dataclass
class Score:
    """A model's loss over a split: the mean loss per token (nats), how many tokens, and the UTF-8 bytes of the text
    they encode (None when the vocabulary is unknown). Bits per byte compares models whose tokens differ."""
    loss: float
    tokens: int
    text_bytes: int | None

    @property
    def bits_per_byte(self):
        return self.loss * self.tokens / math.log(2) / self.text_bytes if self.text_bytes else None


def score_line(split, score):
    """'val loss 1.7750 (perplexity 5.90) over 111,539 tokens; 2.5608 bits per byte over 111,539 bytes'."""
    perplexity = math.exp(score.loss) if score.loss < 700 else math.inf  # exp overflows a float past ~709
    line = f"{split} loss {score.loss:.4f} (perplexity {perplexity:.2f}) over {score.tokens:,} tokens"
    if score.bits_per_byte is None:
        return line
    return f"{line}; {score.bits_per_byte:.4f} bits per byte over {score.text_bytes:,} bytes"


def token_byte_lengths(meta, vocab_size):
    """A tensor of vocab_size: the UTF-8 bytes of text each id stands for (0 for <|endoftext|> and for the padding
    rows of a model's embedding), from a vocabulary description (None: GPT-2's, nanoGPT's convention). None where the
    tokenizer cannot be loaded (GPT-2's files offline without a cache): bits per byte are then left out."""
    try:
        lengths = tokenizer_from_meta(meta).byte_lengths()
    except UserError:
        return None
    table = torch.zeros(max(vocab_size, len(lengths)), dtype=torch.long)
    table[:len(lengths)] = torch.tensor(lengths, dtype=torch.long)
    return table


def checkpoint_split(ckpt, *, split="val", dataset=None, data_dir=None):
    """A Scoring of a loaded checkpoint (ours or nanoGPT's) on a split of the dataset it was trained on, or of
    `dataset`."""
    config = ckpt.get("config", {})
    name = dataset or config.get("dataset")
    if not name:
        raise UserError("the checkpoint does not say which dataset it was trained on: pass --dataset=NAME")
    data = Dataset(data_dir or config.get("data_dir", "data"), name)
    trained = ckpt.get("meta")
    grow = data.is_chat and same_vocabulary(strip_chat(data.meta), trained)  # a base model on its chat data
    if trained is not None and data.meta is not None and not same_vocabulary(trained, data.meta) and not grow:
        raise UserError(f"the model's vocabulary ({describe(trained)}, from dataset "
                        f"'{config.get('dataset', '?')}') is not dataset '{name}''s ({describe(data.meta)}): "
                        f"score it on data prepared with its tokenizer, e.g. --dataset={config.get('dataset', 'NAME')}")
    model = model_from_checkpoint(ckpt)
    if grow and data.vocab_size > model.config.vocab_size:  # as fine-tuning starts from it: the chat tokens added
        model.grow_vocabulary(data.vocab_size)
    vocab_size = model.config.vocab_size
    data.check_token_ids(vocab_size)
    lengths = token_byte_lengths(data.vocabulary if grow or trained is None else trained, vocab_size)
    return Scoring(model, data.splits[split], data.trained[split], name, lengths)


@dataclass
class Scoring:
    """A split to score a model on: its model (CPU), the split's tokens, which of them are trained (chat
    data) or None, the dataset's name, and the bytes per token id (None when the tokenizer is unknown)."""
    model: torch.nn.Module
    data: np.ndarray
    trained: np.ndarray | None
    name: str
    byte_lengths: torch.Tensor | None

    @torch.no_grad()
    def score(self, *, block_size=None, batch_size, device, ctx, progress=None):
        """The Score over every token of the split: non-overlapping windows of block_size (the model's unless given;
        the last one shorter), each token predicted once from the tokens before it in its window. Reads the split batch
        by batch (memory stays bounded for any size of val.bin); byte_lengths (bytes per id, token_byte_lengths)
        counts the text's bytes; a chat split's trained mask scores only the assistant's tokens; progress(n) is
        called with the tokens of each batch."""
        model, data, trained = self.model.to(device), self.data, self.trained
        block_size, byte_lengths = block_size or model.config.block_size, self.byte_lengths
        was_training = model.training
        model.eval()
        scored = len(data) - 1
        starts = np.arange(0, scored, block_size)
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        n_bytes = torch.zeros((), dtype=torch.long, device=device)
        lengths = None if byte_lengths is None else byte_lengths.to(device)
        whole, last = starts[starts + block_size <= scored], starts[starts + block_size > scored]
        for length, group in ((block_size, whole), (None, last)):
            for i in range(0, len(group), batch_size):
                rows = group[i:i + batch_size]
                T = length or scored - int(rows[0])
                X, Y = batch_at(data, rows, block_size=T, device=device, trained=trained)
                with ctx:
                    logits, _ = model(X, Y)
                total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), Y.reshape(-1), reduction="sum",
                                         ignore_index=-1).double()
                count += int((Y >= 0).sum()) if trained is not None else Y.numel()
                if lengths is not None:
                    n_bytes += lengths[Y.clamp(min=0)][Y >= 0].sum()
                if progress:
                    progress(Y.numel())
        model.train(was_training)
        return Score(total.item() / count, count, int(n_bytes.item()) if lengths is not None else None)
