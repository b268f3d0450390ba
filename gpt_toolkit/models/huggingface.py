"""GPT-2 weights in Hugging Face's format, both ways, through the optional transformers package: OpenAI's gpt2*
(a download on first use, then its cache), a local transformers GPT-2 directory (someone's fine-tuned model, or one
we exported; offline), and our checkpoints exported as such a directory (GPT2LMHeadModel + tokenizer files)."""
import json
import os
import socket
import urllib.parse
from pathlib import Path

import torch

from gpt_toolkit.core.bpe import EOT
from gpt_toolkit.core.errors import UserError, first_line, import_optional
from gpt_toolkit.core.files import remove_stale_temps, write_directory
from gpt_toolkit.core.tokenizer import (
    BPE_FILE,
    CHAT_TEMPLATE,
    CHAT_TOKENS,
    END,
    GPT2_VOCAB_SIZE,
    BPETokenizer,
    CharTokenizer,
    ChatTokenizer,
    GPT2Tokenizer,
)
from model import GPT, GPT2_PADDED_VOCAB, config_from_hf, model_options, state_dict_from_hf

CHAR_VOCAB = "char_vocab.json"  # an exported character model's vocabulary: {"tokenizer": "char", "itos": [...]}
# What tiktoken's gpt2 encoding is built from: byte for byte the vocab.json and merges.txt transformers reads.
GPT2_BPE_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
# GELU variants close enough to our exact GELU (nanoGPT loads OpenAI's gelu_new weights the same way)
GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_gpt2(model_type, dropout=0.0):
    """GPT(model_type) with OpenAI's weights; a missing package or an offline first use is a one-line UserError, said
    at once: where the Hub cannot be reached, weights in the Hugging Face cache load offline, and without them
    there is nothing to retry (huggingface_hub's retries took 30-72 s before the same error)."""
    import_optional("transformers", f"init_from={model_type}")
    import huggingface_hub
    from huggingface_hub import constants
    try:
        if _hub_reachable(constants.ENDPOINT):
            return GPT.from_pretrained(model_type, dict(dropout=dropout))
        if not isinstance(huggingface_hub.try_to_load_from_cache(model_type, "config.json"), str):
            raise UserError(f"could not load {model_type} weights from Hugging Face (cannot reach {constants.ENDPOINT}, "
                            f"and they are not in the Hugging Face cache): the first use needs internet; afterwards "
                            f"they come from the cache")
        offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # from the cache, with no request
        try:
            return GPT.from_pretrained(model_type, dict(dropout=dropout))
        finally:
            constants.HF_HUB_OFFLINE = offline
    except OSError as e:
        first = first_line(e)
        raise UserError(f"could not load {model_type} weights from Hugging Face ({first[:150]}): the first use needs "
                        f"internet; afterwards they come from the Hugging Face cache") from None


def _hub_reachable(endpoint, timeout=3.0):
    """False when HF_HUB_OFFLINE is set or a TCP connection to the Hub's host fails within `timeout` seconds; True
    behind a proxy (the connection goes through it: huggingface_hub's own requests decide)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _transformers(needed_for):
    transformers = import_optional("transformers", needed_for)
    transformers.utils.logging.disable_progress_bar()  # a bar per file of a few small files is noise
    return transformers


def hf_dir_config(path):
    """The directory's config.json, checked to describe a GPT-2 this model can hold (read without transformers)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"init_from={path}: its config.json is unreadable ({e}): point init_from at a transformers "
                        f"model directory") from None
    where = f"init_from={path}"
    if config.get("model_type") != "gpt2":
        raise UserError(f"{where} holds a '{config.get('model_type')}' model: only GPT-2 directories "
                        f"(GPT2LMHeadModel) load into this GPT")
    if config.get("activation_function", "gelu_new") not in GELUS:
        raise UserError(f"{where} uses activation {config['activation_function']}: this GPT has GELU only")
    if config.get("n_inner") not in (None, 4 * config.get("n_embd", 768)):
        raise UserError(f"{where} has an MLP of width n_inner={config['n_inner']}: this GPT's is 4 * n_embd")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("add_cross_attention"):
        raise UserError(f"{where} uses attention options this GPT does not have (scale_attn_by_inverse_layer_idx, "
                        f"add_cross_attention)")
    if config.get("tie_word_embeddings", True) is False:
        raise UserError(f"{where} has an output layer separate from its token embedding: this GPT ties them")
    if abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise UserError(f"{where} has layer_norm_epsilon={config['layer_norm_epsilon']}: this GPT's is 1e-5")
    return config


def hf_dir_model_args(path, dropout=0.0):
    """GPTConfig fields of the model in a transformers directory, known before loading its weights."""
    c = hf_dir_config(path)
    return dict(n_layer=c.get("n_layer", 12), n_head=c.get("n_head", 12), n_embd=c.get("n_embd", 768),
                block_size=c.get("n_positions", 1024), bias=True, vocab_size=c.get("vocab_size", GPT2_VOCAB_SIZE),
                dropout=dropout)


def load_hf_dir(path, dropout=0.0):
    """GPT with the weights of a local transformers GPT-2 directory, offline."""
    hf_dir_config(path)
    transformers = _transformers(f"init_from={path}")
    try:  # a truncated file, weights that disagree with config.json, a pickle that is not plain data: transformers
        # and safetensors raise many kinds of error for a damaged directory, all of which mean the same to a user
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True)
        model = GPT(config_from_hf(hf_model.config, dropout=dropout))
        model.load_state_dict({k: v.float() for k, v in state_dict_from_hf(hf_model.state_dict()).items()})
    except Exception as e:
        raise UserError(f"init_from={path}: could not load its weights ({type(e).__name__}: {_cut(first_line(e))}): "
                        f"export the model again, or check that its files are whole") from None
    return model


def _cut(text, limit=160):
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def tokenizer_for_hf_dir(path):
    """The tokenizer of a transformers directory: its tokenizer.json when it is one of ours (a character vocabulary or
    an own byte-level BPE, with the chat tokens when it has them), an older export's char_vocab.json, else GPT-2's
    BPE (with the chat tokens when its tokenizer.json adds them)."""
    path = Path(path)
    if (path / BPE_FILE).is_file():
        try:
            text = (path / BPE_FILE).read_text(encoding="utf-8")
            spec = json.loads(text)
            model = spec["model"]
            chat = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["content"] in CHAT_TOKENS[1:]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path / BPE_FILE} is unreadable ({e}): export the model again") from None
        base = None
        if model.get("type") == "WordLevel":
            vocab = model.get("vocab", {})
            base = CharTokenizer(sorted(vocab, key=vocab.get))
        elif model.get("type") == "BPE" and model.get("vocab", {}).get(EOT) == 0:  # ours: <|endoftext|> first
            spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["content"] not in chat]
            base = BPETokenizer(json.dumps(spec))
        elif chat:
            base = GPT2Tokenizer()
        if base is not None and chat:
            eot = next((t["id"] for t in spec.get("added_tokens", []) if t["content"] == EOT), None)
            return ChatTokenizer(base, {**chat, EOT: eot if eot is not None else base.eot})
        if base is not None:
            return base
    if (path / CHAR_VOCAB).is_file():
        try:
            meta = json.loads((path / CHAR_VOCAB).read_text(encoding="utf-8"))
            return CharTokenizer(meta["itos"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path / CHAR_VOCAB} is unreadable ({e}): export the model again") from None
    vocab_size = hf_dir_model_args(path)["vocab_size"]
    if vocab_size not in (GPT2_VOCAB_SIZE, GPT2_PADDED_VOCAB):
        raise UserError(f"{path} has a {vocab_size}-token vocabulary and no {CHAR_VOCAB}: sample.py decodes GPT-2 BPE "
                        f"and this toolkit's character vocabularies only")
    return GPT2Tokenizer()


# ----------------------------------------------------------------------------- export

def hf_state_dict(model, hf_keys, vocab_size):
    """Our state dict under transformers' names and shapes: Conv1D weights transposed, the token embedding cut to
    vocab_size rows (dropping the padding), zero biases where the model has none (bias=False)."""
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {}
    for key, shape in hf_keys.items():
        if key in ours:
            value = ours.pop(key)
            value = value.t() if key.endswith(CONV1D) else value
            out[key] = value[:vocab_size].contiguous() if key in ("transformer.wte.weight", "lm_head.weight") else value
        elif key.endswith(".bias"):
            out[key] = torch.zeros(shape)
    if ours:
        raise ValueError(f"parameters with no place in GPT2LMHeadModel: {sorted(ours)[:5]}")
    return out


def check_gpt2_architecture(config, target):
    """A model with options (model.MODEL_OPTIONS) GPT-2's architecture lacks cannot be written as one: a one-line
    UserError naming them, before anything is written."""
    options = model_options(config)
    if options:
        named = ", ".join(f"{k}={v}" for k, v in options.items())
        raise UserError(f"this model was trained with {named}, which {target} cannot express (GPT-2's architecture "
                        f"has none of them): sample.py, tools/evaluate.py, tools/serve.py and --init_from run it as it "
                        f"is; to export, train a model without those options")


def export_hf(model, tokenizer, to, *, dropout=0.0, source=None):
    """Write `model` (our GPT, float32) with its tokenizer as a transformers GPT-2 directory at `to`: all of it
    or nothing (built beside it, then renamed into place), every file readable as any other. The tokenizer is a
    tokenizer.json (characters, an own BPE) or GPT-2's vocab.json and merges.txt, so AutoTokenizer encodes as we do;
    README.md, the model card, states the context (`source`: where the weights came from, for it). Returns the names
    of the files written."""
    check_gpt2_architecture(model.config, "transformers' GPT2LMHeadModel")
    transformers = _transformers("tools/export_hf.py")
    cfg = model.config
    vocab_size = tokenizer.vocab_size
    if vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model only {cfg.vocab_size}")
    eot = getattr(tokenizer, "eot", None)
    eos = getattr(tokenizer, "end_of_turn", eot)  # a chat model's answer ends at <|end|>
    hf_config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        activation_function="gelu",  # ours is the exact GELU, not GPT-2's tanh approximation
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, layer_norm_epsilon=1e-5,
        bos_token_id=eot, eos_token_id=eos, tie_word_embeddings=True)
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    # generate() past n_positions fails (IndexError: GPT-2's position table ends there; sample.py crops instead). The
    # limit is config.json's n_positions and the model card's, not a generation_config max_length: transformers warns
    # on every call that gives max_new_tokens when that is set (docs/huggingface.md)
    hf_keys = {k: v.shape for k, v in hf_model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model, hf_keys, vocab_size), strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"export left GPT2LMHeadModel's {missing or unexpected} unset")

    def fill(directory):
        hf_model.save_pretrained(directory)
        write_tokenizer(directory, tokenizer, cfg.block_size, transformers)
        (directory / "README.md").write_text(model_card(Path(to).name, cfg, tokenizer, source), encoding="utf-8")

    remove_stale_temps(Path(to).parent)  # what exports killed mid-write left beside it
    try:
        write_directory(to, fill)
    except UserError:
        raise
    except Exception as e:  # a full disk or a read-only place: OSError, safetensors' SafetensorError, torch's RuntimeError
        cause = e.strerror if isinstance(e, OSError) and e.strerror else _cut(first_line(e))
        raise UserError(f"could not write the export to {to} ({cause}): nothing was left behind; free disk space or "
                        f"choose another --to") from None
    return sorted(p.name for p in Path(to).iterdir())


def model_card(name, cfg, tokenizer, source=None):
    """The export's README.md: what the model is and its context, the hard limit of a transformers generation, with a
    pipeline call that keeps to it."""
    n = cfg.block_size
    origin = f" from {source}" if source else ""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- gpt2
- gpt-toolkit
---
# {name}

A GPT-2 (`GPT2LMHeadModel`) exported by gpt-toolkit's `tools/export_hf.py`{origin}: {cfg.n_layer} layers, {cfg.n_head}
heads, {cfg.n_embd}-dimensional embeddings, a {tokenizer.vocab_size:,}-token {tokenizer.kind} tokenizer.

## Context: {n} tokens

The context is **{n} tokens** (`n_positions` in `config.json`), and transformers does not crop a longer one: keep a
prompt plus `max_new_tokens` within {n} tokens. A generation that reads a position past the context ({n + 2} tokens in
all or more) logs "the current text generation call has exceeded the model's predefined maximum length ({n})" and
then stops with `IndexError: index out of range in self`. The text-generation pipeline asks for 256 new tokens when
given no length, so give it `max_new_tokens`:

```python
from transformers import pipeline

generate = pipeline("text-generation", model="{name}")
prompt = "ROMEO:"
room = {n} - len(generate.tokenizer(prompt)["input_ids"])
print(generate(prompt, max_new_tokens=min(100, room))[0]["generated_text"])
```

gpt-toolkit's `python sample.py --init_from=DIR` samples past the context (it keeps the last {n} tokens).
"""


def write_tokenizer(directory, tokenizer, max_length, transformers):
    """The tokenizer files AutoTokenizer reads as our tokenizer encodes: GPT-2's vocab.json and merges.txt, or a
    tokenizer.json (a character vocabulary, an own BPE); a chat model's with its chat tokens at their ids and the
    template as tokenizer_config.json's chat_template (apply_chat_template gives our ids)."""
    chat = getattr(tokenizer, "specials", None)
    base = tokenizer.base if chat else tokenizer
    if base.kind == "gpt2":
        write_gpt2_tokenizer(directory, max_length)
        if not chat:
            return
        fast = transformers.AutoTokenizer.from_pretrained(str(directory))  # the files just written, as users load them
        fast.add_special_tokens({"additional_special_tokens": [t for t in CHAT_TOKENS if t != EOT]})
        fast.eos_token, fast.chat_template, fast.model_max_length = END, CHAT_TEMPLATE, max_length
        fast.save_pretrained(str(directory))
        return
    from tokenizers import AddedToken, Tokenizer
    spec = char_tokenizer_json(base.itos) if base.kind == "char" else base.json
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False}
    if base.kind == "bpe":
        config.update(bos_token=EOT, eos_token=EOT, unk_token=EOT)
    if chat:
        tok = Tokenizer.from_str(spec)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS
                                if tok.token_to_id(t) is None])
        if any(tok.token_to_id(t) != i for t, i in chat.items()):
            raise ValueError(f"the chat tokens took other ids in tokenizer.json than the model's {chat}")
        spec = tok.to_str()
        config.update(bos_token=EOT, eos_token=END, chat_template=CHAT_TEMPLATE)
    (directory / BPE_FILE).write_text(spec, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def char_tokenizer_json(itos):
    """A tokenizer.json for a character vocabulary: every character its own token (a WordLevel model over a split into
    single characters), ids as in itos, decoded by joining them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(itos)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def read_gpt2_file(name):
    """The bytes of GPT-2's vocab.json or merges.txt, from tiktoken's cache (no network when it is filled)."""
    import tiktoken.load
    url, sha256 = GPT2_BPE_FILES[name]
    try:
        return tiktoken.load.read_file_cached(url, sha256)
    except Exception as e:
        raise UserError(f"cannot read GPT-2's {name} ({type(e).__name__}: {e}); offline, point TIKTOKEN_CACHE_DIR "
                        f"at a directory holding tiktoken's cached gpt2 files") from None


def write_gpt2_tokenizer(directory, max_length):
    """vocab.json and merges.txt (from tiktoken's cache: no network when it is filled) and the config that makes
    AutoTokenizer read them as GPT-2's tokenizer."""
    for name in GPT2_BPE_FILES:
        (directory / name).write_bytes(read_gpt2_file(name))
    eot = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "bos_token": eot, "eos_token": eot,
              "unk_token": eot, "add_prefix_space": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def export_peft_adapter(model, to):
    """Write a LoRA model's adapters as a PEFT adapter directory at `to` (adapter_config.json and
    adapter_model.safetensors, peft's names and shapes: GPT-2's Conv1D layers take them with fan_in_fan_out), which
    peft.PeftModel.from_pretrained loads onto the base model's export. All of it or nothing. Returns the file names."""
    check_gpt2_architecture(model.config, "transformers' GPT2LMHeadModel (the adapter's base)")
    import json

    from safetensors.torch import save_file

    from gpt_toolkit.models.lora import LoRALinear
    info = model.lora
    if info.get("token_ids"):
        raise UserError(f"this LoRA run also trained the embedding rows of its {len(info['token_ids'])} chat tokens, "
                        f"which the base model's export does not have: export the merged model instead (drop --lora)")
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().float().cpu().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info["rank"], "lora_alpha": info["alpha"],
              "lora_dropout": info["dropout"], "target_modules": list(info["targets"]), "fan_in_fan_out": True,
              "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
              "base_model_name_or_path": info["base"]["path"]}

    def fill(directory):
        (Path(directory) / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(Path(directory) / "adapter_model.safetensors"), metadata={"format": "pt"})

    remove_stale_temps(Path(to).parent)
    try:
        write_directory(to, fill)
    except UserError:
        raise
    except Exception as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else _cut(first_line(e))
        raise UserError(f"could not write the adapter to {to} ({cause}): nothing was left behind; free disk space or "
                        f"choose another --to") from None
    return sorted(p.name for p in Path(to).iterdir())
