"""Chat datasets: conversations read from JSON Lines, rendered with the chat template (tokenizer.ChatTokenizer: a
turn is its role's token, its content, then <|end|>), and written with which targets are trained:

    <|system|>You are terse.<|end|><|user|>Who art thou?<|end|><|assistant|>A friend.<|end|><|endoftext|>

Training learns only the assistant's tokens and the <|end|> after them (mask 1 for those targets)."""
import json
from pathlib import Path

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.tokenizer import CHAT_TOKENS, EOT, ROLES, ChatTokenizer, special_ids, strip_chat


def read_conversations(path, *, skip_bad=False):
    """([(line number, messages)], {reason: count} skipped) from a JSON Lines file of {"messages": [{"role", "content"}, ...]}
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
            conversations.append((number, conversation(raw, f"{path} line {number}")))
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
    except RecursionError:
        raise UserError(f"{where}: not JSON this toolkit reads (nested too deep)") from None
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


# ----------------------------------------------------------------------------- a chat dataset

def base_tokenizer(*, tokenizer=None, tokenizer_from=None, vocab_size=None, texts=()):
    """(the base vocabulary description, the longest context of the model it comes from or None): the tokenizer of
    the model to fine-tune (a run's out_dir, an exported transformers directory, a dataset directory), or a new one
    (char over `texts`, GPT-2's, or a BPE of vocab_size trained on `texts`)."""
    from gpt_toolkit.core.bpe import MAX_VOCAB, MIN_VOCAB, train_bpe
    from gpt_toolkit.core.tokenizer import BPETokenizer, read_meta, vocabulary_of
    from gpt_toolkit.models.checkpoint import BEST, LATEST, is_hf_dir, load_checkpoint
    from gpt_toolkit.models.huggingface import hf_dir_model_args, tokenizer_for_hf_dir

    if tokenizer_from:
        source = Path(tokenizer_from)
        if (source / BEST).exists() or (source / LATEST).exists():
            ckpt = load_checkpoint(source / BEST if (source / BEST).exists() else source / LATEST, optimizer=False)
            meta = ckpt.get("meta") or vocabulary_of_gpt2()
            return strip_chat(meta), ckpt["model_args"]["block_size"]
        if is_hf_dir(source):
            return vocabulary_of(tokenizer_for_hf_dir(source)), hf_dir_model_args(source)["block_size"]
        meta = read_meta(source) if source.is_dir() else None
        if meta is None:
            raise UserError(f"--tokenizer_from={tokenizer_from} is neither a run's out_dir (ckpt.pt), a transformers "
                            f"directory (config.json) nor a prepared dataset (meta.json): check the path")
        return strip_chat({k: v for k, v in meta.items() if k != "files"}), None
    if tokenizer == "char":
        itos = sorted(set("".join(texts)))
        return {"tokenizer": "char", "vocab_size": len(itos), "itos": itos}, None
    if tokenizer == "gpt2":
        return vocabulary_of_gpt2(), None
    if vocab_size is None or not MIN_VOCAB <= vocab_size <= MAX_VOCAB - len(CHAT_TOKENS):
        raise UserError(f"--tokenizer=bpe needs --vocab_size from {MIN_VOCAB} to {MAX_VOCAB - len(CHAT_TOKENS):,} (the "
                        f"chat tokens take ids above it, and ids are stored as uint16)")
    return vocabulary_of(BPETokenizer(train_bpe(texts, vocab_size))), None


def vocabulary_of_gpt2():
    from gpt_toolkit.core.tokenizer import GPT2_EOT, GPT2_VOCAB_SIZE
    return {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT}


def chat_vocabulary(base_meta, specials, vocab_size):
    """The vocabulary description of a chat dataset: its base's, with the chat tokens."""
    return {**base_meta, "vocab_size": vocab_size, "eot_token": specials[EOT],
            "chat": {"special_tokens": specials, "base_vocab_size": base_meta["vocab_size"],
                     "base_eot_token": base_meta.get("eot_token")}}


def prepare_chat_dataset(conversations, out_dir, tokenizer, *, block_size=None, val_fraction=0.1, skip_bad=False,
                         skipped=None, report=print):
    """Render (line number, messages) conversations with the template and write a chat dataset into out_dir:
    train.bin/val.bin (uint16 ids), train.mask.bin/val.mask.bin (1 where the target is trained), meta.json (the base
    vocabulary, the chat tokens), tokenizer.json for a BPE; all together or not at all. tokenizer: a
    preparing.TokenizerChoice (a new one, or the model's to fine-tune: of_model). The last conversations
    (val_fraction, at least one) are val. A conversation longer than block_size + 1 tokens, or with characters a
    character vocabulary lacks, is a one-line error with its line number, or with skip_bad skipped and counted."""
    import numpy as np

    from gpt_toolkit.core.bpe import MAX_VOCAB
    from gpt_toolkit.core.tokenizer import BPE_FILE, tokenizer_from_meta
    from gpt_toolkit.data.preparing import commit_dataset, owned_dataset_dir, write_meta

    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    n_val = max(1, round(len(conversations) * val_fraction))
    if len(conversations) - n_val < 1:
        raise UserError(f"{len(conversations)} conversation(s): train and val need at least one each")
    # as data/prepare_text.py does: a character vocabulary holds every character of both splits (a character only
    # val has would refuse a valid file); a BPE learns from train only (its bytes cover any text)
    texts = [m["content"] for _, messages in (conversations if tokenizer.kind == "char" else conversations[:-n_val])
             for m in messages]
    base_meta, model_block = base_tokenizer(tokenizer=tokenizer.kind, tokenizer_from=tokenizer.of_model,
                                            vocab_size=tokenizer.vocab_size, texts=texts)
    block_size = block_size or model_block or 1024
    base = tokenizer_from_meta(base_meta)
    specials = special_ids(base)
    tok = ChatTokenizer(base, specials)
    if tok.vocab_size > MAX_VOCAB:
        raise UserError(f"the vocabulary with the chat tokens has {tok.vocab_size:,} ids: more than uint16 holds; use "
                        f"a BPE of at most {MAX_VOCAB - len(CHAT_TOKENS):,}")
    skipped = dict(skipped or {})
    good = []
    for number, messages in conversations:
        try:
            ids, mask = tok.render(messages, end=True)
            if len(ids) > block_size + 1:
                raise UserError(f"line {number}: the conversation is {len(ids):,} tokens, longer than block_size "
                                f"{block_size} + 1: shorten it, or give a longer --block_size (and train with it)")
        except UserError as e:
            if not skip_bad:
                text = str(e) if str(e).startswith("line ") else f"line {number}: {e}"
                raise UserError(f"{text} (or pass --skip_bad=True to skip such lines)") from None
            reason = "longer than block_size" if "longer than block_size" in str(e) else "with characters outside " \
                     "the vocabulary"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        good.append((ids, mask))
    n_val = max(1, round(len(good) * val_fraction))  # of the conversations kept: val is never left empty by skips
    if len(good) - n_val < 1:
        raise UserError(f"{len(good)} conversation(s) left after skipping the bad ones: train and val need at least "
                        f"one each")
    rendered = {"train": good[:-n_val], "val": good[-n_val:]}
    meta = chat_vocabulary(base_meta, specials, tok.vocab_size)
    on_disk = {k: v for k, v in meta.items() if k != "tokenizer_json"}
    if base_meta["tokenizer"] == "bpe":
        on_disk["tokenizer_file"] = BPE_FILE

    def write_all(files):
        for split, rows in rendered.items():
            files[out_dir / f"{split}.bin"].write(np.array([t for ids, _ in rows for t in ids], dtype=np.uint16).tobytes())
            files[out_dir / f"{split}.mask.bin"].write(np.array([m for _, mask in rows for m in mask],
                                                                dtype=np.uint8).tobytes())
        if base_meta["tokenizer"] == "bpe":
            files[out_dir / BPE_FILE].write(base_meta["tokenizer_json"].encode("utf-8"))
        write_meta(files, out_dir, on_disk)

    out_dir = Path(out_dir)
    extras = ["train.mask.bin", "val.mask.bin"] + ([BPE_FILE] if base_meta["tokenizer"] == "bpe" else [])
    with owned_dataset_dir(out_dir):
        commit_dataset(out_dir, extras, write_all)
    tokens = sum(len(ids) for rows in rendered.values() for ids, _ in rows)
    trained = sum(sum(mask) for rows in rendered.values() for _, mask in rows)
    return {"conversations": sum(len(r) for r in rendered.values()), "train_conversations": len(rendered["train"]),
            "val_conversations": len(rendered["val"]), "tokens": tokens, "trained": trained,
            "vocab_size": tok.vocab_size, "tokenizer": base_meta["tokenizer"], "skipped": skipped,
            "block_size": block_size}
