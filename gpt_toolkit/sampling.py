"""Loading a trained model for generation: from an out_dir's checkpoint (ours or nanoGPT's) with the vocabulary it
was trained on, a local Hugging Face GPT-2 directory, or OpenAI's GPT-2 weights; and reading the prompt.
sample.py and tools/report.py generate with it."""
import codecs
from pathlib import Path

import torch

from gpt_toolkit.checkpoint import load_checkpoint, model_from_checkpoint, run_checkpoint
from gpt_toolkit.errors import UserError
from gpt_toolkit.huggingface import is_hf_dir, load_gpt2, load_hf_dir, tokenizer_for_hf_dir
from gpt_toolkit.memory import available_memory, fmt_bytes
from gpt_toolkit.tokenizer import GPT2_VOCAB_SIZE, read_meta, read_text, tokenizer_from_meta


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    return read_text(start[len("FILE:"):], what="prompt file")


def tokenizer_for_checkpoint(ckpt):
    """The vocabulary the model was trained with: stored in our checkpoints; for nanoGPT's, the dataset's
    meta.pkl; with neither, GPT-2 BPE when the vocabulary is GPT-2 sized."""
    meta = ckpt.get("meta")
    config = ckpt.get("config", {})
    if meta is None and "dataset" in config:
        meta = read_meta(Path(config.get("data_dir", "data")) / config["dataset"])
    if meta is None and ckpt["model_args"]["vocab_size"] < GPT2_VOCAB_SIZE:
        where = Path(config.get("data_dir", "data")) / config.get("dataset", "?")
        raise UserError(f"the model has a {ckpt['model_args']['vocab_size']}-token vocabulary but {where} has no meta.pkl "
                        f"or meta.json to decode it: re-run that dataset's prepare.py")
    return tokenizer_from_meta(meta)


def load_model(cfg, device):
    if cfg.init_from == "resume":
        path = run_checkpoint(cfg.out_dir, cfg.checkpoint)
        ckpt = load_checkpoint(path, map_location="cpu", verify=getattr(cfg, "verify_checkpoint", True))
        model = model_from_checkpoint(ckpt)
        tokenizer = tokenizer_for_checkpoint(ckpt)
    elif is_hf_dir(cfg.init_from):
        model, tokenizer = load_hf_dir(cfg.init_from), tokenizer_for_hf_dir(cfg.init_from)
    else:
        model = load_gpt2(cfg.init_from)
        tokenizer = tokenizer_from_meta(None)
    return model.eval().to(device), tokenizer


def check_generation_fits(model, num_samples, device):
    """Refuse, before generating, a batch of samples whose KV caches and logits cannot fit the device (the kernel's
    out-of-memory killer would end the process without a word)."""
    c = model.config
    per_sample = 2 * c.n_layer * c.block_size * c.n_embd * 4 + 3 * c.vocab_size * 4 + 16 * c.block_size * c.n_embd
    have, what = available_memory(device)
    if have is not None and num_samples * per_sample > have:
        raise UserError(f"num_samples={num_samples:,} generated as one batch needs about {fmt_bytes(num_samples * per_sample)} "
                        f"(KV caches and logits) but {device} has {fmt_bytes(have)} ({what}): use --num_samples="
                        f"{max(1, int(have // per_sample // 2)):,} or fewer")


class TextStream:
    """Text of tokens that arrive one at a time: each push returns the characters now complete, holding back the
    bytes of a character that a BPE token splits until the rest arrives. Joined, the pieces equal decode(all ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tokenizer.token_bytes(token))

    def end(self):
        return self.decoder.decode(b"", final=True)


def write_samples(model, tokenizer, prompt, *, num_samples, max_new_tokens, temperature, top_k, kv_cache, device, ctx,
                  write, echo_prompt=True):
    """Generate num_samples continuations of prompt, each written with write(text) and ended by a separator line.
    One sample streams (its text is written as its tokens are drawn); several run as one batch (each generation
    step then reads the weights once for every sample) and are written at the end."""
    ids = tokenizer.encode(prompt)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...].repeat(num_samples, 1)
    top_k = top_k or None
    with torch.no_grad(), ctx:
        if num_samples == 1:
            text = TextStream(tokenizer)
            if echo_prompt:
                write(tokenizer.decode(ids))
            for token in model.stream(x, max_new_tokens, temperature=temperature, top_k=top_k, kv_cache=kv_cache):
                write(text.push(token.item()))
            write(text.end() + "\n---------------\n")
            return
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, kv_cache=kv_cache)
    for row in y.tolist():
        write(tokenizer.decode(row if echo_prompt else row[len(ids):]) + "\n---------------\n")
