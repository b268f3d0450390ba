"""The model a checkpoint holds, whatever trained it: a plain run's or nanoGPT's (checkpoint.plain_model), or a LoRA
run's, whose checkpoint holds only adapters: its base is loaded from where the run found it, checked against the
fingerprint the run recorded, and given the adapters (lora_model, for a resume), or with them merged in
(model_from_checkpoint, for sampling, evaluation and exports)."""
from pathlib import Path

from gpt_toolkit import lora
from gpt_toolkit.checkpoint import load_checkpoint, plain_model
from gpt_toolkit.errors import UserError
from gpt_toolkit.huggingface import load_pretrained


def model_from_checkpoint(ckpt, dropout=0.0):
    """The GPT a loaded checkpoint holds, as a plain GPT: a LoRA run's base with its adapters merged in."""
    if ckpt.get("lora") is not None:
        return lora.merged_model(lora_model(ckpt, dropout))
    return plain_model(ckpt, dropout)


def load_base(source, dropout=0.0):
    """The base GPT a LoRA checkpoint's `lora.base` names, loaded as the run loaded it."""
    path = source["path"]
    if source["kind"] in ("run", "hf") and not Path(path).exists():
        raise UserError(f"this LoRA run's base model {path} is gone: the adapters apply to those weights only; put "
                        f"the base back there (and merge them with tools/merge_lora.py, which needs no base after)")
    if source["kind"] == "run":
        ckpt = load_checkpoint(path)
        if (ckpt.get("lora") or {}).get("base", {}).get("path") == path:
            raise UserError(f"this LoRA run's base {path} has been replaced by a LoRA checkpoint that names itself as "
                            f"its base: the base weights are gone; train the adapters again from a kept base")
        return model_from_checkpoint(ckpt, dropout)
    return load_pretrained(path, dropout)


def lora_model(ckpt, dropout=0.0):
    """The model of a LoRA run's checkpoint, adapters unmerged (what a resume trains): its base, checked against the
    fingerprint the run recorded, resized as the run resized it, with the adapters and token rows loaded."""
    info = ckpt["lora"]
    model = load_base(info["base"], dropout)
    found = lora.fingerprint(model.state_dict())
    if found != info["base"]["fingerprint"]:
        raise UserError(f"this LoRA run's base {info['base']['path']} has changed since the run started (its weights' "
                        f"fingerprint is {found}, the adapters were trained on {info['base']['fingerprint']}): adapters "
                        f"only fit the weights they were trained on; restore that base, or train new adapters on it")
    args = ckpt["model_args"]
    if args["vocab_size"] > model.config.vocab_size:
        model.grow_vocabulary(args["vocab_size"])
    if args["block_size"] < model.config.block_size:
        model.crop_block_size(args["block_size"])
    settings = lora.LoRASettings(rank=info["rank"], alpha=info["alpha"], dropout=info["dropout"],
                                 targets=tuple(info["targets"]))
    lora.add_lora(model, settings, token_ids=info.get("token_ids", ()))
    result = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in result.missing_keys if lora.is_adapter_key(k)]
    if result.unexpected_keys or missing:
        raise UserError(f"the checkpoint's adapters do not fit its LoRA settings ({lora.describe(info)}; "
                        f"{(result.unexpected_keys or missing)[0]}): the file was edited or damaged; use another "
                        f"checkpoint of the run (latest.pt, ckpt.pt)")
    model.lora = info
    return model
