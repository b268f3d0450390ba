"""A byte-level BPE of your own corpus: trained with Hugging Face's tokenizers (GPT-2's pre-tokenizer rules, an
<|endoftext|> special token) and kept as its tokenizer.json, the file transformers' AutoTokenizer reads. Encoding
goes through tiktoken, built from the same merges (the ranks of a trained BPE are its merge order, as GPT-2's are):
several times faster than the tokenizers library on one thread, and the same ids (tested against it)."""
import json

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import child_signals, forking_children

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer pattern: what tokenizers' ByteLevel(use_regex=True) splits on, and tiktoken's gpt2 pat_str
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MIN_VOCAB = 257  # every byte, and <|endoftext|>
MAX_VOCAB = 65536  # token ids are stored as uint16


def train_bpe(texts, vocab_size):
    """The tokenizer.json (a string) of a byte-level BPE trained on `texts` (a list of strings) up to vocab_size
    ids: <|endoftext|> is id 0, the 256 bytes follow, then the merges. A corpus with fewer pairs than that gives a
    smaller vocabulary (its size is the tokenizer's). The training (tokenizers' Rust code: a minute on 100 MB, deaf to
    Ctrl-C) runs in a child process where the platform forks, so that a Ctrl-C ends it at once."""
    if not system.forks():  # a spawned child would pickle the whole corpus over, and start torch afresh
        return _train_bpe(texts, vocab_size)
    context = system.child_context()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_train_bpe_into, args=(send, texts, vocab_size),
                                                        daemon=True)
    with forking_children():  # the child dies at the SIGTERM that ends it, even inside Rust
        child.start()
    send.close()
    try:
        while not receive.poll(0.1):
            if not child.is_alive():
                raise RuntimeError(f"training the BPE failed: its process ended with exit code {child.exitcode}")
        error, result = receive.recv()
    finally:
        if child.is_alive():
            child.terminate()
        child.join()
        receive.close()
    if error:
        raise RuntimeError(f"training the BPE failed: {error}")
    return result


def _train_bpe_into(send, texts, vocab_size):
    child_signals()  # the parent takes Ctrl-C, and ends this process
    try:
        send.send((None, _train_bpe(texts, vocab_size)))
    except Exception as e:  # shown by the parent, which raises it
        send.send((f"{type(e).__name__}: {e}", None))


def _train_bpe(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def _byte_decoder():
    """GPT-2's map from the printable characters byte-level BPE writes back to the bytes they stand for."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def ranks_and_specials(tokenizer_json):
    """({token bytes: id}, {special token: id}) of a byte-level BPE tokenizer.json: what tiktoken encodes with."""
    spec = json.loads(tokenizer_json)
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    to_byte = _byte_decoder()
    ranks = {bytes(to_byte[c] for c in token): i for token, i in spec["model"]["vocab"].items() if token not in specials}
    return ranks, specials


def tiktoken_encoding(tokenizer_json, name="bpe"):
    """A tiktoken Encoding with this tokenizer's merges and special tokens."""
    import tiktoken
    ranks, specials = ranks_and_specials(tokenizer_json)
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
