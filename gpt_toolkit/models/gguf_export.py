"""Export to GGUF, the file llama.cpp, ollama and LM Studio run: llama.cpp's GPT-2 architecture (its tensor names and
hyperparameters) with the tokenizer, written by the `gguf` package (llama.cpp's own writer).

Tokenizers: GPT-2's (tiktoken's encoder.json and vocab.bpe as the token list and merges), an own byte-level BPE (its
tokenizer.json's vocabulary and merges), and a character vocabulary (llama.cpp's RWKV vocabulary, whose longest-match
tokenizer gives each character its own id, as ours does). Chat models add their tokens as control tokens, the chat
template, and <|end|> as the end of a turn. The token tensor keeps the tokenizer's rows only (nanoGPT pads GPT-2's
50,257 to 50,304), so llama.cpp's vocabulary and the tensor agree.
"""
import json
import os

import numpy as np
import torch

from gpt_toolkit.core.errors import UserError, import_optional
from gpt_toolkit.core.files import atomic_write_path, write_failure_cause
from gpt_toolkit.core.tokenizer import CHAT_TEMPLATE, EOT
from gpt_toolkit.models.huggingface import check_gpt2_architecture

DTYPES = ("f32", "f16", "q8_0")
BLOCK_TENSORS = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_TENSORS = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
NORMAL, CONTROL = 1, 3  # llama.cpp's token types


def rwkv_escaped(text):
    """A token as llama.cpp's RWKV vocabulary writes it: its UTF-8 text with backslash, tab, newline and carriage
    return escaped (llama_unescape_rwkv_token reads them back)."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def gguf_vocabulary(tokenizer):
    """(tokenizer model, tokens, token types, merges, special ids) that llama.cpp reads as our tokenizer: the same ids
    for the same text. GPT-2 and an own BPE are llama.cpp's byte-level BPE ("gpt2", GPT-2's pre-tokenizer); a character
    vocabulary is its "rwkv" vocabulary, which matches the longest token at each byte: with single characters, each
    character is its own token, as ours, whatever the script (and it has no default end-of-text token, which would stop
    every generation at one of the characters)."""
    chat = getattr(tokenizer, "specials", None)
    base = tokenizer.base if chat else tokenizer
    specials, merges = {}, []
    if base.kind == "gpt2":
        from gpt_toolkit.models.huggingface import read_gpt2_file
        vocab = json.loads(read_gpt2_file("vocab.json"))
        merges = [line for line in read_gpt2_file("merges.txt").decode("utf-8").splitlines()[1:] if line.strip()]
        tokens, model = sorted(vocab, key=vocab.get), "gpt2"
        specials[EOT] = vocab[EOT]
    elif base.kind == "bpe":
        spec = json.loads(base.json)
        vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        tokens, model = sorted(vocab, key=vocab.get), "gpt2"
        specials.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    else:
        try:
            tokens, model = [rwkv_escaped(c) for c in base.itos if c.encode("utf-8")], "rwkv"
        except UnicodeEncodeError as e:
            raise UserError(f"the character vocabulary holds {e.object[e.start:e.end]!r}, which is not a character "
                            f"UTF-8 can write, so llama.cpp cannot hold it: prepare the data again from UTF-8 text, "
                            f"or use tools/export_hf.py") from None
        if len(tokens) != len(base.itos):
            raise UserError("the character vocabulary has an empty token, which llama.cpp cannot match: prepare the "
                            "data again")
    types = [NORMAL] * len(tokens)
    for text, i in {**specials, **(chat or {})}.items():
        if i >= len(tokens):
            tokens += [f"[PAD{j}]" for j in range(len(tokens), i + 1)]
            types += [NORMAL] * (i + 1 - len(types))
        tokens[i], types[i] = text, CONTROL
    if len(tokens) != tokenizer.vocab_size:
        raise UserError(f"the tokenizer's files give {len(tokens)} tokens but it has {tokenizer.vocab_size}: prepare "
                        f"the dataset again")
    return model, tokens, types, merges, {**specials, **(chat or {})}


def gguf_tensors(model, vocab_size):
    """(name, float32 array) in llama.cpp's GPT-2 layout: nn.Linear's (out, in) weights, the token embedding cut to
    the vocabulary's rows, zero biases where the model has none (bias=False: llama.cpp's GPT-2 always reads them)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = []

    def add(ours, theirs, rows=None):
        weight = state[f"{ours}.weight"]
        out.append((f"{theirs}.weight", weight[:rows] if rows else weight))
        if not ours.startswith(("transformer.wte", "transformer.wpe")):
            bias = state.get(f"{ours}.bias")
            out.append((f"{theirs}.bias", bias if bias is not None else torch.zeros(weight.shape[0])))
    add("transformer.wte", "token_embd", rows=vocab_size)
    add("transformer.wpe", "position_embd")
    for i in range(model.config.n_layer):
        for ours, theirs in BLOCK_TENSORS.items():
            add(f"transformer.h.{i}.{ours}", f"blk.{i}.{theirs}")
    add("transformer.ln_f", "output_norm")
    return [(name, t.numpy()) for name, t in out]


def write_gguf(model, tokenizer, path, *, dtype="f16", name="gpt-toolkit"):
    """Write model (our GPT) and tokenizer as a GGUF file at path, whole or not at all. Returns the file's size."""
    check_gpt2_architecture(model.config, "llama.cpp's GPT-2 architecture")
    gguf = import_optional("gguf", "tools/export_gguf.py")
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype} is not one of {', '.join(DTYPES)}")
    cfg = model.config
    if dtype == "q8_0" and cfg.n_embd % 32:
        raise UserError(f"--dtype=q8_0 packs rows in blocks of 32 and n_embd={cfg.n_embd} is not a multiple of 32: "
                        f"use --dtype=f16 or f32")
    tokenizer_model, tokens, types, merges, specials = gguf_vocabulary(tokenizer)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tensors = gguf_tensors(model, len(tokens))

    def write(tmp):
        writer = gguf.GGUFWriter(str(tmp), "gpt2")
        writer.add_name(name)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(1e-5)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model(tokenizer_model)
        if tokenizer_model == "gpt2":
            writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if merges:
            writer.add_token_merges(merges)
        writer.add_add_bos_token(False)
        if EOT in specials:
            writer.add_bos_token_id(specials[EOT])
        end = getattr(tokenizer, "end_of_turn", None)
        if end is not None or EOT in specials:  # a chat model's answer ends at <|end|> (each key is written once)
            writer.add_eos_token_id(end if end is not None else specials[EOT])
        if end is not None:  # and the template makes the turns
            writer.add_eot_token_id(end)
            writer.add_chat_template(CHAT_TEMPLATE)
        for tensor_name, data in tensors:
            array, raw_dtype = encoded(gguf, data, dtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        atomic_write_path(path, write, replace=False)  # a file made at path meanwhile is never replaced
    except OSError as e:
        raise UserError(f"could not write {path} ({write_failure_cause(e, path)}): nothing was left behind; free disk "
                        f"space or choose another --to") from None
    return os.path.getsize(path)


def encoded(gguf, data, dtype):
    """(array, raw_dtype) of one tensor for add_tensor: 1-D ones (norms, biases) stay float32; matrices in dtype."""
    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), None
    if dtype == "f16":
        return data.astype(np.float16), None
    quant = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data.astype(np.float32), quant), quant

