"""Tokenizers and vocabulary files, without torch (so preparing data starts fast and its worker processes stay
small): characters, GPT-2 BPE (tiktoken) and a BPE of your own (bpe.py), a dataset's meta.json / nanoGPT's meta.pkl,
reading and downloading text."""
import hashlib
import json
import pickle
import re
import urllib.request
from pathlib import Path

from gpt_toolkit.core.bpe import EOT
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.files import atomic_write

TOKENIZERS = ("char", "gpt2", "bpe")
BPE_FILE = "tokenizer.json"  # an own BPE's tokenizer, beside the dataset's .bin files (and in exports)
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------- tokenizers

class CharTokenizer:
    kind = "char"

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = "".join(unknown[:20])
            raise UserError(f"text has {len(unknown)} character(s) outside this dataset's vocabulary: {shown!r}; "
                            f"use only characters the training text contains")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def token_bytes(self, i):
        return self.itos[i].encode("utf-8")

    def byte_lengths(self):
        """UTF-8 bytes of each id's text (what bits per byte divides by)."""
        return [len(c.encode("utf-8")) for c in self.itos]


class GPT2Tokenizer:
    kind = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot = GPT2_EOT

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}: {e}); offline, point "
                            f"TIKTOKEN_CACHE_DIR at a directory holding its cached files") from None

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def encode_ordinary(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self, i):
        """A token's bytes: a piece of a UTF-8 character for some tokens (decode whole texts, or see TextStream)."""
        return self.enc.decode_single_token_bytes(i)

    def byte_lengths(self):
        """Bytes of text each id stands for; <|endoftext|> stands for none."""
        return [len(self.enc.decode_single_token_bytes(i)) for i in range(GPT2_EOT)] + [0]


class BPETokenizer:
    """A byte-level BPE trained on a dataset's own text (bpe.py), from its tokenizer.json."""

    kind = "bpe"

    def __init__(self, tokenizer_json):
        from gpt_toolkit.core.bpe import EOT, tiktoken_encoding
        self.json = tokenizer_json
        try:
            self.enc = tiktoken_encoding(tokenizer_json)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"the BPE tokenizer.json is unreadable ({type(e).__name__}: {e}): prepare the dataset "
                            f"again") from None
        self.vocab_size = self.enc.max_token_value + 1
        self.eot = self.enc.encode_single_token(EOT)

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")

    def encode_ordinary(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self, i):
        return b"" if i == self.eot else self.enc.decode_single_token_bytes(i)

    def byte_lengths(self):
        return [len(self.token_bytes(i)) for i in range(self.vocab_size)]


class _RefuseGlobals(pickle.Unpickler):
    """Reads only plain data (dicts, lists, str, numbers): a vocabulary never needs more, and
    refusing every class keeps a hostile meta.pkl from running code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is allowed")


def read_meta(data_dir):
    """The dataset's vocabulary description (meta.json preferred, else nanoGPT's meta.pkl), or None."""
    data_dir = Path(data_dir)
    try:
        if (data_dir / "meta.json").exists():
            with open(data_dir / "meta.json", encoding="utf-8") as f:
                meta = json.load(f)
        elif (data_dir / "meta.pkl").exists():
            with open(data_dir / "meta.pkl", "rb") as f:
                meta = _RefuseGlobals(f).load()
            if "itos" in meta:
                itos = meta["itos"]
                itos = [itos[i] for i in range(len(itos))] if isinstance(itos, dict) else list(itos)
                meta = {"tokenizer": "char", "vocab_size": meta.get("vocab_size", len(itos)), "itos": itos}
        else:
            return None
    except Exception as e:  # an unpickler fed damaged bytes can raise nearly anything (IndexError, OverflowError, ...)
        raise UserError(f"vocabulary file in {data_dir} is unreadable ({e}): re-run that dataset's prepare.py") from None
    if not isinstance(meta, dict) or meta.get("tokenizer") not in TOKENIZERS:
        raise UserError(f"vocabulary file in {data_dir} is not a char, gpt2 or bpe description: re-run that dataset's "
                        f"prepare.py")
    if meta["tokenizer"] == "bpe":  # the tokenizer itself travels in the vocabulary (and so into checkpoints)
        try:
            meta["tokenizer_json"] = (data_dir / meta.get("tokenizer_file", BPE_FILE)).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"{data_dir / BPE_FILE} is unreadable ({e.strerror or e}): prepare that dataset again "
                            f"(data/prepare_text.py --tokenizer=bpe)") from None
    check_meta(meta, f"the vocabulary file in {data_dir}", "re-run that dataset's prepare.py")
    return meta


def check_meta(meta, where, fix):
    """A vocabulary description has what the toolkit reads from it, of the right types (an edited file is one line)."""
    chat = meta.get("chat")
    if chat is not None:  # a chat vocabulary: its base vocabulary, then the chat tokens numbered after it
        specials = chat.get("special_tokens") if isinstance(chat, dict) else None
        base_size = chat.get("base_vocab_size") if isinstance(chat, dict) else None
        if (not isinstance(specials, dict) or set(specials) != set(CHAT_TOKENS) or isinstance(base_size, bool)
                or not isinstance(base_size, int)
                or not all(isinstance(i, int) and 0 <= i < meta.get("vocab_size", 0) for i in specials.values())):
            raise UserError(f"{where} has a damaged 'chat' section (special_tokens, base_vocab_size): {fix}")
        check_meta(strip_chat(meta), where, fix)
        return
    size = meta.get("vocab_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise UserError(f"{where} gives vocab_size={size!r}, not a positive int: {fix}")
    itos = meta.get("itos")
    if meta["tokenizer"] == "char" and (not isinstance(itos, list) or len(itos) != size
                                        or not all(isinstance(c, str) for c in itos)):
        raise UserError(f"{where} has no list 'itos' of its {size} characters: {fix}")
    if meta["tokenizer"] == "bpe" and not isinstance(meta.get("tokenizer_json"), str):
        raise UserError(f"{where} has no tokenizer (tokenizer_json): {fix}")


# ----------------------------------------------------------------------------- chat: the template's tokens
# A turn is its role's token, its content, then <|end|>; a training conversation ends with <|endoftext|>; generation
# prompts with <|assistant|> and stops at <|end|>. Exports carry the same template as transformers' chat_template.

END = "<|end|>"
ROLES = ("system", "user", "assistant")
CHAT_TOKENS = (EOT, "<|system|>", "<|user|>", "<|assistant|>", END)
# transformers' apply_chat_template renders this to the very text our ids spell (tested)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def role_token(role):
    return f"<|{role}|>"


def special_ids(base):
    """The chat tokens' ids for a base tokenizer (char, gpt2, bpe): its own <|endoftext|> where it has one, then
    the next free ids. A GPT-2 vocabulary keeps its 50,257 ids and the new ones fall in its padding rows (50,257 and
    on, below 50,304), so checkpoints keep nanoGPT's shape."""
    ids, next_id = {}, base.vocab_size
    for token in CHAT_TOKENS:
        if token == EOT and getattr(base, "eot", None) is not None:
            ids[token] = base.eot
        else:
            ids[token], next_id = next_id, next_id + 1
    return ids


class ChatTokenizer:
    """A base tokenizer with the chat tokens: special strings in text become their ids, their ids decode back to
    them, and they stand for no bytes of text (bits per byte)."""

    def __init__(self, base, specials):
        self.base, self.specials = base, dict(specials)
        self.kind = base.kind
        self.by_id = {i: t for t, i in self.specials.items()}
        self.vocab_size = max(base.vocab_size, max(self.specials.values()) + 1)
        self.eot, self.end_of_turn = self.specials[EOT], self.specials[END]
        self.split = re.compile("(" + "|".join(re.escape(t) for t in self.specials) + ")")

    def encode(self, text):
        ids = []
        for piece in self.split.split(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids += self.encode_ordinary(piece)
        return ids

    def encode_ordinary(self, text):
        return self.base.encode_ordinary(text) if hasattr(self.base, "encode_ordinary") else self.base.encode(text)

    def decode(self, ids):
        out, run = [], []
        for i in ids:
            if i in self.by_id:
                out += [self.base.decode(run), self.by_id[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.base.decode(run)

    def token_bytes(self, i):
        return b"" if i in self.by_id else self.base.token_bytes(i)

    def byte_lengths(self):
        lengths = list(self.base.byte_lengths())[:self.base.vocab_size]
        lengths += [0] * (self.vocab_size - len(lengths))
        for i in self.by_id:
            lengths[i] = 0
        return lengths

    def render(self, messages, *, add_generation_prompt=False, end=False):
        """(ids, mask) of a conversation in the template: mask[t] is 1 where token t is a trained target (the
        assistant's content and its <|end|>). end=True closes it with <|endoftext|> (training data)."""
        ids, mask = [], []
        for m in messages:
            content = self.encode_ordinary(m["content"])
            trained = int(m["role"] == "assistant")
            ids += [self.specials[role_token(m["role"])], *content, self.end_of_turn]
            mask += [0, *[trained] * len(content), trained]
        if add_generation_prompt:
            ids.append(self.specials[role_token("assistant")])
            mask.append(0)
        if end:
            ids.append(self.eot)
            mask.append(0)
        return ids, mask


def strip_chat(meta):
    """The base vocabulary of a (possibly chat) vocabulary description."""
    if not meta.get("chat"):
        return dict(meta)
    base = {k: v for k, v in meta.items() if k not in ("chat", "eot_token")}
    base["vocab_size"] = meta["chat"]["base_vocab_size"]
    if meta["chat"].get("base_eot_token") is not None:
        base["eot_token"] = meta["chat"]["base_eot_token"]
    return base


def describe(meta):
    """'char, 65 tokens (characters 1c9b0e)' / 'gpt2, 50,257 tokens' / 'bpe, 1,024 tokens (tokenizer 3fa2c1)': for
    one-line errors."""
    if meta is None:
        meta = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE}
    text = f"{meta['tokenizer']}, {meta['vocab_size']:,} tokens"
    if meta["tokenizer"] in ("char", "bpe"):  # two of a size differ in their content: a short hash tells them apart
        content = meta.get("tokenizer_json") or "".join(meta.get("itos") or ())
        text += f" ({'tokenizer' if meta['tokenizer'] == 'bpe' else 'characters'} " \
                f"{hashlib.sha256(content.encode()).hexdigest()[:6]})"
    return text


def same_vocabulary(a, b):
    """Whether two vocabulary descriptions (None: GPT-2's) encode text the same way."""
    def key(meta):
        meta = meta or {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE}
        return (meta["tokenizer"], meta["vocab_size"], tuple(meta.get("itos") or ()), meta.get("tokenizer_json"))
    return key(a) == key(b)


def vocabulary_of(tokenizer):
    """The vocabulary description (as a dataset's meta.json gives it) of a tokenizer object."""
    if tokenizer.kind == "char":
        return {"tokenizer": "char", "vocab_size": tokenizer.vocab_size, "itos": tokenizer.itos}
    if tokenizer.kind == "bpe":
        return {"tokenizer": "bpe", "vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot,
                "tokenizer_json": tokenizer.json}
    return {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT}


def tokenizer_from_meta(meta):
    """CharTokenizer for a char vocabulary, BPETokenizer for an own BPE; GPT-2 BPE when there is no meta (nanoGPT's
    convention) or it says gpt2; any of them with the chat tokens (ChatTokenizer) for a chat dataset's."""
    if meta is not None and meta.get("chat"):
        return ChatTokenizer(tokenizer_from_meta(strip_chat(meta)), meta["chat"]["special_tokens"])
    if meta is not None and meta["tokenizer"] == "char":
        return CharTokenizer(meta["itos"])
    if meta is not None and meta["tokenizer"] == "bpe":
        return BPETokenizer(meta["tokenizer_json"])
    return GPT2Tokenizer()


# ----------------------------------------------------------------------------- preparing data

def read_text(path, what="input file"):
    """A UTF-8 text file's contents; `what` names the file in the one-line errors."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' not found: check the path") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} '{path}': {e.strerror}") from None


def download(url, dest):
    """Fetch url into dest (written whole or not at all)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            atomic_write(dest, lambda f: f.write(r.read()))
    except OSError as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}): save the text as {dest} or pass --input PATH") from None


# ----------------------------------------------------------------------------- training data
