"""Chat: one template of special tokens for conversations, the tokenizer that knows them, and reading conversations
from JSON Lines. A turn is its role's token, its content, then <|end|>:

    <|system|>You are terse.<|end|><|user|>Who art thou?<|end|><|assistant|>A friend.<|end|><|endoftext|>

Training learns only the assistant's tokens and the <|end|> after them (mask 1 for those targets); generation
prompts with <|assistant|> and stops at <|end|>. Exports carry the same template as transformers' chat_template."""
import json
import re
from pathlib import Path

from gpt_toolkit.errors import UserError

EOT, END = "<|endoftext|>", "<|end|>"
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
                ids += self.base.encode_ordinary(piece) if hasattr(self.base, "encode_ordinary") else self.base.encode(piece)
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


def read_conversations(path, *, skip_bad=False):
    """(conversations, {reason: count} skipped) from a JSON Lines file of {"messages": [{"role", "content"}, ...]}
    or {"prompt", "completion"} records. A bad line is a one-line UserError with its number, or with skip_bad
    skipped and counted."""
    conversations, skipped = [], {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): check --input") from None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            conversations.append(conversation(raw, f"{path} line {number}"))
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{e} (or pass --skip_bad=True to skip such lines)") from None
            reason = str(e).split(": ", 1)[1].split(":")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
    if not conversations:
        raise UserError(f"{path} holds no conversation: each line is {{\"messages\": [...]}} or "
                        f"{{\"prompt\": ..., \"completion\": ...}}")
    return conversations, skipped


def conversation(raw, where):
    """The messages of one JSON line, checked."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text: convert the file to UTF-8") from None
    except ValueError as e:
        raise UserError(f"{where}: not JSON ({e})") from None
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
    else:
        raise UserError(f"{where}: not a conversation: expected {{\"messages\": [...]}} or {{\"prompt\": ..., "
                        f"\"completion\": ...}}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise UserError(f"{where}: unknown role {role!r}: roles are system, user and assistant")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: a {m['role']} turn without text content")
        if any(token in m["content"] for token in CHAT_TOKENS):
            raise UserError(f"{where}: its text holds one of the chat's own tokens ({', '.join(CHAT_TOKENS)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant turn: nothing to learn from it")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
