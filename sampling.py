"""Loading a trained model for generation: from an out_dir's checkpoint (ours or nanoGPT's) with the vocabulary it
was trained on, or OpenAI's GPT-2 weights; and reading the prompt. sample.py and tools/report.py generate with it."""
from pathlib import Path

from checkpoint import LATEST, load_checkpoint
from dataset import GPT2_VOCAB_SIZE, read_meta, read_text, tokenizer_from_meta
from errors import UserError
from model import GPT, GPTConfig
from pretrained import load_gpt2


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
        out_dir = Path(cfg.out_dir)
        if not out_dir.is_dir():
            raise UserError(f"out_dir '{out_dir}' does not exist: pass the --out_dir you trained with")
        path = out_dir / cfg.checkpoint
        if not path.exists() and (out_dir / LATEST).exists():
            raise UserError(f"no {cfg.checkpoint} in {out_dir} (no evaluation improved on the first yet): "
                            f"sample the newest state with --checkpoint={LATEST}")
        ckpt = load_checkpoint(path, map_location="cpu")
        model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": 0.0}))
        model.load_state_dict(ckpt["model"])
        tokenizer = tokenizer_for_checkpoint(ckpt)
    else:
        model = load_gpt2(cfg.init_from)
        tokenizer = tokenizer_from_meta(None)
    return model.eval().to(device), tokenizer
