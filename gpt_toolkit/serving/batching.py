"""Continuous batching: every request in flight decodes in one forward pass per step, each against its own keys and
values (Slots: one row per request, each of its own length), requests joining and leaving between steps. A request's
prompt runs alone first (its prefill, as sample.py's stream runs it), and its cache is copied into a row."""
import torch

from model import KVCache, sample_next


class Slots:
    """The KV cache of the requests in flight: per layer, keys and values of shape (rows, heads, block_size, head
    size), row i holding lengths[i] positions. Rows stay packed: a leaving row's place takes the last row. A model's
    attention layers call extend() as they call KVCache's (duck-typed: `length` is never 0, so a step's one new token
    attends as layout()'s mask allows)."""
    length = 1

    def __init__(self, n_layer, block_size):
        self.n_layer, self.block_size = n_layer, block_size
        self.keys = self.values = None
        self.lengths = []

    def clear(self):
        """No rows, and no buffers: what they held goes back (the engine clears them when it has nothing in flight)."""
        self.keys = self.values = None
        self.lengths = []

    def join(self, cache):
        """Add a row with a one-row KVCache's keys and values (a prefilled prompt); returns its row."""
        row = len(self.lengths)
        if self.keys is None or row == self.keys[0].size(0):
            self._grow(cache)
        self.lengths.append(0)
        self.replace(row, cache)
        return row

    def replace(self, row, cache):
        """Row `row` becomes a one-row cache's (a prompt's, or a context rebuilt over its last half block). The rest of
        the row is zeroed: a KVCache's unwritten positions hold whatever memory held, and a NaN there would reach every
        row's attention through the masked scores (NaN + -inf is NaN)."""
        n = cache.length
        for layer in range(self.n_layer):
            for mine, theirs in ((self.keys[layer][row], cache.keys[layer][0]), (self.values[layer][row],
                                                                                  cache.values[layer][0])):
                mine[:, :n] = theirs[:, :n]
                mine[:, n:] = 0
        self.lengths[row] = n

    def leave(self, row):
        """Drop a row; the last row moves into its place (returns the row that moved there, or None)."""
        last = len(self.lengths) - 1
        if row != last:
            for layer in range(self.n_layer):
                self.keys[layer][row] = self.keys[layer][last]
                self.values[layer][row] = self.values[layer][last]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        return last if row != last else None

    def _grow(self, cache):
        rows = max(4, 2 * (self.keys[0].size(0) if self.keys is not None else 0))
        grown_k, grown_v = [], []
        for layer in range(self.n_layer):
            k = cache.keys[layer].new_zeros((rows, *cache.keys[layer].shape[1:]))
            v = cache.values[layer].new_zeros((rows, *cache.values[layer].shape[1:]))
            if self.keys is not None:
                k[:len(self.lengths)] = self.keys[layer][:len(self.lengths)]
                v[:len(self.lengths)] = self.values[layer][:len(self.lengths)]
            grown_k.append(k)
            grown_v.append(v)
        self.keys, self.values = grown_k, grown_v

    def layout(self, device):
        """GPT.forward's layout for one new token per row: its position (the row's length), a mask over the row's
        cached positions and itself, every row's logits kept."""
        n, span = len(self.lengths), max(self.lengths) + 1
        lengths = torch.tensor(self.lengths, device=device)
        self._at = lengths
        mask = torch.arange(span, device=device)[None, :] <= lengths[:, None]
        return lengths[:, None], mask[:, None, None, :], torch.ones(n, 1, dtype=torch.bool, device=device)

    def extend(self, layer, k, v):
        """Store each row's one new key and value (k, v: (rows, heads, 1, head size)) at its own position; returns the
        keys and values up to the longest row's (the mask hides what a shorter row does not have)."""
        n = len(self.lengths)
        rows = torch.arange(n, device=k.device)
        keys, values = self.keys[layer], self.values[layer]
        keys[rows, :, self._at] = k[:, :, 0].to(keys.dtype)
        values[rows, :, self._at] = v[:, :, 0].to(values.dtype)
        span = max(self.lengths) + 1
        if layer == self.n_layer - 1:
            self.lengths = [length + 1 for length in self.lengths]
        return keys[:n, :, :span], values[:n, :, :span]


def prefill(model, ids, device):
    """(the last position's logits (1, vocab), a one-row KVCache) of a prompt (its last block_size tokens)."""
    cache = KVCache(model.config.n_layer, model.config.block_size)
    x = torch.tensor([ids[-model.config.block_size:]], dtype=torch.long, device=device)
    logits, _ = model(x, kv_cache=cache)
    return logits[:, -1, :], cache


def draw(logits, controls, previous, generator):
    """One token (an int) from one row's logits (1, vocab), as GPT.stream draws it."""
    return int(sample_next(logits, controls.get("temperature", 1.0), controls.get("top_k"),
                           top_p=controls.get("top_p"), min_p=controls.get("min_p"),
                           repetition_penalty=controls.get("repetition_penalty", 1.0), previous=previous,
                           generator=generator))
