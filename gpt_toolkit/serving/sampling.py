"""Generation's pieces: reading the prompt, the memory a batch of samples needs, streaming text token by token and
cutting it at stop strings, writing samples. sample.py and tools/report.py generate with them (the model comes from
gpt_toolkit.models.source.load_model)."""
import codecs
from dataclasses import dataclass

import torch

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.tokenizer import read_text
from gpt_toolkit.models.memory import available_memory, fmt_bytes


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    return read_text(start[len("FILE:"):], what="prompt file")


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


class StopAtStrings:
    """Streamed text cut at the first of some stop strings, which is not written: push(text) returns what can be
    written now, holding back an end that could still become a stop string (one split across two tokens); `stopped`
    turns True once one was seen. end() returns what is held back when no stop string came.

    Each stop string is followed by its Knuth-Morris-Pratt automaton (how many of its first characters end the text
    so far), so a push costs the length of its text, not the stop strings' lengths squared: a server's one generation
    thread must not be stalled by a client's long stop string."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fallbacks = [_kmp_fallbacks(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # of each stop string, how many first characters end the text so far
        self.held, self.stopped = "", False

    def push(self, text):
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self.held += text
        complete = False
        for i, (stop, fallback) in enumerate(zip(self.stops, self.fallbacks)):
            matched = self.matched[i]
            for ch in text:
                while matched and stop[matched] != ch:
                    matched = fallback[matched - 1]
                if stop[matched] == ch:
                    matched += 1
                if matched == len(stop):
                    complete = True
                    break
            self.matched[i] = matched
        if complete:  # the earliest stop string in what is held (held is shorter than the longest stop plus text)
            cut = min(i for i in (self.held.find(s) for s in self.stops) if i >= 0)
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = max(self.matched)  # the longest end of the text that could still become a stop string
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def end(self):
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def _kmp_fallbacks(s):
    """fallback[k - 1]: the length of the longest proper prefix of s[:k] that is also its suffix (Knuth-Morris-Pratt's
    failure function), where a partial match of k characters falls back to when the next character does not fit."""
    fallback, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fallback[k - 1]
        if s[i] == s[k]:
            k += 1
        fallback[i] = k
    return fallback


@dataclass(frozen=True)
class Samples:
    """What write_samples generates: num_samples continuations of up to max_new_tokens each, drawn with controls
    (sample_next's: temperature, top_k, top_p, min_p, repetition_penalty) and the KV cache or not; each ends at one
    of stop_tokens or stop strings (neither written), is written after the prompt (echo_prompt) and ended by
    separator."""
    num_samples: int
    max_new_tokens: int
    controls: dict
    kv_cache: bool = True
    echo_prompt: bool = True
    stop: tuple = ()
    stop_tokens: tuple = ()
    separator: str = "\n---------------\n"


def write_samples(model, tokenizer, prompt, samples, *, device, ctx, write):
    """Generate the Samples of prompt (text, or token ids), each written with write(text). One sample streams (its
    text is written as its tokens are drawn); several run as one batch (each generation step then reads the weights
    once for every sample) and are written at the end. Returns the new ids of the last sample."""
    num_samples, max_new_tokens, kv_cache = samples.num_samples, samples.max_new_tokens, samples.kv_cache
    echo_prompt, stop, stop_tokens, separator = samples.echo_prompt, samples.stop, samples.stop_tokens, samples.separator
    controls = samples.controls
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...].repeat(num_samples, 1)
    controls = {**controls, "top_k": controls.get("top_k") or None, "stop_tokens": stop_tokens}
    with torch.no_grad(), ctx:
        if num_samples == 1:
            text, cut, new = TextStream(tokenizer), StopAtStrings(stop), []
            if echo_prompt:
                write(tokenizer.decode(ids))
            for token in model.stream(x, max_new_tokens, kv_cache=kv_cache, **controls):
                if token.item() in stop_tokens:
                    break
                new.append(token.item())
                write(cut.push(text.push(token.item())))
                if cut.stopped:
                    break
            write(cut.push(text.end()) + cut.end() + separator)
            return new
        y = model.generate(x, max_new_tokens, kv_cache=kv_cache, **controls)
    for row in y[:, len(ids):].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_tokens), len(row))
        cut = StopAtStrings(stop)
        body = cut.push(tokenizer.decode(row[:end])) + cut.end()
        write((tokenizer.decode(ids) if echo_prompt else "") + body + separator)
    return row[:end]


def fit_history(tokenizer, history, limit):
    """(the prompt ids of the conversation with an assistant turn opened, how many of the oldest non-system turns
    had to go for it to fit `limit` tokens); the newest turn always stays (cut from the left if it alone is too long).
    Each turn is rendered once (the template is the turns' renderings one after another), so a long history costs its
    length, not its length times its turns."""
    keep_system = int(bool(history) and history[0]["role"] == "system")
    pieces = [tokenizer.render([turn])[0] for turn in history]
    opening, _ = tokenizer.render([], add_generation_prompt=True)
    total = len(opening) + sum(len(p) for p in pieces)
    dropped, droppable = 0, len(history) - keep_system - 1
    while total > limit and dropped < droppable:
        total -= len(pieces[keep_system + dropped])
        dropped += 1
    ids = [t for p in pieces[:keep_system] + pieces[keep_system + dropped:] for t in p] + opening
    return ids[-limit:], dropped


def stop_token_ids(tokenizer):
    """The ids a sample ends at by default: <|endoftext|> and a chat's <|end|>, where the vocabulary has them."""
    return tuple(i for i in (getattr(tokenizer, "eot", None), getattr(tokenizer, "end_of_turn", None)) if i is not None)
