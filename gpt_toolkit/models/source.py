"""Where a model comes from, resolved once. init_from (scratch, resume, another run's out_dir, a transformers
directory, a GPT-2 size) becomes a ModelSource when the command line is checked, and ModelSource.model() is the one
loader that train.py, sample.py, the server, evaluate, the exports and merge_lora use: a checkpoint's model (ours or
nanoGPT's, or a LoRA run's: its base, checked against the fingerprint the run recorded, with the adapters unmerged
for a resume or merged in for everything else), a transformers directory's, or OpenAI's GPT-2. This is the one
module that reads the init_from string."""
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt_toolkit.core.errors import ConfigError, UserError, first_line, short
from gpt_toolkit.core.process import release_pages
from gpt_toolkit.core.system import mapped_ranges
from gpt_toolkit.core.tokenizer import GPT2_VOCAB_SIZE, read_meta, tokenizer_from_meta
from gpt_toolkit.models import lora
from gpt_toolkit.models.checkpoint import (
    BEST,
    LATEST,
    MODEL_ARGS,
    is_hf_dir,
    is_run_dir,
    load_checkpoint,
    resume_path,
    run_checkpoint,
)
from gpt_toolkit.models.huggingface import hf_dir_config, load_gpt2, load_hf_dir, tokenizer_for_hf_dir
from model import GPT, GPT2_SIZES, MODEL_OPTIONS, GPTConfig

SCRATCH, RESUME, RUN, HF, GPT2 = "scratch", "resume", "run", "hf", "gpt2"


@dataclass(frozen=True)
class ModelSource:
    """kind: scratch (a new model), resume (the run in out_dir), run (another run's weights), hf (a transformers
    GPT-2 directory) or gpt2 (OpenAI's weights); where: the out_dir (resume), the run's directory or checkpoint file
    (run), the directory (hf), the size (gpt2)."""
    kind: str
    where: str = ""

    @classmethod
    def parse(cls, init_from, *, out_dir="", allowed=(SCRATCH, RESUME)):
        """The source init_from names: one of `allowed` (scratch, resume), another run's out_dir, a transformers
        directory (checked to be a GPT-2 before any data is read), or a GPT-2 size, in transformers' order (a
        directory of a size's name comes first). Anything else is a one-line ConfigError."""
        if init_from in allowed:
            return cls(init_from, str(out_dir) if init_from == RESUME else "")
        if is_run_dir(init_from):
            return cls(RUN, init_from)
        if is_hf_dir(init_from):
            hf_dir_config(init_from)  # a directory of another architecture is refused here
            return cls(HF, init_from)
        if init_from in GPT2_SIZES:
            return cls(GPT2, init_from)
        named = ", ".join([*allowed, *GPT2_SIZES])
        raise ConfigError(f"init_from={init_from!r} is not one of {named}, nor a directory with a Hugging Face "
                          f"config.json, nor a run's out_dir (ckpt.pt): check the name or the path")

    @classmethod
    def for_training(cls, cfg):
        """train.py's source, with the checks that need it: LoRA adapts weights that exist and stay as they are."""
        source = cls.parse(cfg.init_from, out_dir=cfg.out_dir)
        if cfg.lora_rank and source.kind == SCRATCH:
            raise ConfigError(f"lora_rank={cfg.lora_rank} fine-tunes trained weights, and init_from=scratch has none (LoRA "
                              f"keeps the base weights frozen, so a new model would stay random): give --init_from=OUT_DIR, "
                              f"gpt2 or a transformers directory, or drop --lora_rank to train every weight")
        if cfg.lora_rank and source.kind != RESUME and Path(source.where).resolve() == Path(cfg.out_dir).resolve():
            raise ConfigError(f"lora_rank={cfg.lora_rank} with init_from={cfg.init_from} and the same out_dir: the "
                              f"adapters need their base kept as it is, and this run would replace it; give the LoRA run "
                              f"another --out_dir")
        return source

    @classmethod
    def run(cls, out_dir):
        """A trained run's directory (or one of its checkpoint files), as readers load it: the checkpoint their
        --checkpoint names (a missing directory is a one-line error naming the runs beside it)."""
        return cls(RESUME, str(out_dir))

    @classmethod
    def at(cls, path):
        """What an export reads from `path`: a transformers directory, else a run (ModelSource.run)."""
        return cls(HF, str(path)) if is_hf_dir(path) else cls.run(path)

    @classmethod
    def of_lora_base(cls, base):
        """The source a LoRA checkpoint's `lora.base` record names (a run's checkpoint file, a transformers directory,
        a GPT-2 size): what base_record wrote."""
        return cls(base["kind"], base["path"])

    @property
    def scratch(self):
        return self.kind == SCRATCH

    @property
    def resumes(self):
        return self.kind == RESUME

    @property
    def fine_tunes(self):
        """Trained weights that start a new run: another run's, a transformers directory's, GPT-2's."""
        return self.kind in (RUN, HF, GPT2)

    @property
    def pretrained(self):
        """Weights from transformers' side: a transformers directory or OpenAI's GPT-2 (transformers loads them)."""
        return self.kind in (HF, GPT2)

    def __str__(self):
        return self.where if self.fine_tunes else self.kind

    @property
    def name(self):
        """A short name for the model: a resumed run's out_dir's, else the last part of what init_from names (a run
        or transformers directory as given, a GPT-2 size)."""
        return Path(self.where).resolve().name if self.kind == RESUME else Path(self.where).name

    def checkpoint_path(self, checkpoint=None):
        """The checkpoint file a run or a reader loads: resume: out_dir's latest.pt (ckpt.pt for nanoGPT's), or the
        one named `checkpoint` (a reader's --checkpoint); run: that run's best (its newest when none is best yet), or
        the file itself. None for sources without a checkpoint."""
        if self.kind == RESUME:
            return resume_path(self.where) if checkpoint is None else run_checkpoint(self.where, checkpoint)
        if self.kind == RUN:
            where = Path(self.where)
            if where.is_file() or checkpoint is not None:
                return run_checkpoint(where, checkpoint or BEST)
            return where / (BEST if (where / BEST).exists() else LATEST)
        return None

    def load_checkpoint(self, checkpoint=None, *, map_location="cpu", verify=True, optimizer=False):
        """(the loaded checkpoint, its path), or (None, None) for sources without one. The optimizer's state is read
        only with optimizer=True (a resume); otherwise the weights are memory-mapped (checkpoint.load_checkpoint)."""
        path = self.checkpoint_path(checkpoint)
        if path is None:
            return None, None
        return load_checkpoint(path, map_location=map_location, verify=verify, optimizer=optimizer), path

    def model(self, ckpt=None, *, dropout=0.0, adapters=False):
        """The one loader: the GPT this source holds (ckpt: its loaded checkpoint, for resume and run). A LoRA run's
        checkpoint gives its base with the adapters merged in, or unmerged with adapters=True (what a resume trains).
        scratch has no weights to load: train.py builds a new GPT from the config."""
        if self.kind in (RESUME, RUN):
            if ckpt.get("lora") is None:
                return plain_model(ckpt, dropout)
            model = lora_model(ckpt, dropout)
            return model if adapters else lora.merged_model(model)
        if self.kind == HF:
            return load_hf_dir(self.where, dropout)
        if self.kind == GPT2:
            return load_gpt2(self.where, dropout)
        raise ValueError("init_from=scratch has no weights to load")

    def tokenizer(self, ckpt=None):
        """The tokenizer the model was trained with (ckpt: its loaded checkpoint, for resume and run)."""
        if self.kind in (RESUME, RUN):
            return tokenizer_for_checkpoint(ckpt)
        return tokenizer_for_hf_dir(self.where) if self.kind == HF else tokenizer_from_meta(None)

    def base_record(self):
        """Where a LoRA run's base comes from, as its checkpoint names it (of_lora_base reads it back): a run's
        checkpoint file or a transformers directory (absolute paths), or a GPT-2 size."""
        if self.kind == RUN:
            return {"kind": RUN, "path": str(self.checkpoint_path().resolve())}
        if self.kind == HF:
            return {"kind": HF, "path": str(Path(self.where).resolve())}
        return {"kind": GPT2, "path": self.where}


def load_model(source, device, *, checkpoint=BEST, verify=True, dtype="float32"):
    """(model in eval mode on device, its tokenizer) for a reader: sample.py, the server, evaluate, report. dtype: the
    precision it will run in (hardware.autocast's); under bfloat16 on a CPU the blocks' matrices are held in
    bfloat16 (what autocast would cast them to at every call, and cache), their float32 pages given back."""
    ckpt, path = source.load_checkpoint(checkpoint, verify=verify)
    model, tokenizer = source.model(ckpt), source.tokenizer(ckpt)
    if dtype == "bfloat16" and str(device).startswith("cpu"):
        hold_blocks_in_bfloat16(model, mapped_ranges(path) if path else [])
    return model.eval().to(device), tokenizer


def hold_blocks_in_bfloat16(model, mapped):
    """The transformer blocks' Linear weights as bfloat16 parameters, one at a time, each float32 original's pages
    given back where it is the checkpoint file's (mapped): bf16 autocast rounds them the same way at each call, so
    generation is unchanged, and the process holds half their bytes instead of the float32 weights and autocast's
    bfloat16 copy of them."""
    for module in model.transformer.h.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            old = module.weight.data
            module.weight = torch.nn.Parameter(old.to(torch.bfloat16), requires_grad=False)
            release_pages(old, mapped)


def model_from_checkpoint(ckpt, dropout=0.0):
    """The GPT a loaded checkpoint holds, as a plain GPT: a LoRA run's base with its adapters merged in."""
    return ModelSource(RUN).model(ckpt, dropout=dropout)


def plain_model(ckpt, dropout=0.0):
    """The GPT a loaded checkpoint of a whole model holds (ours or nanoGPT's), on the device its tensors were loaded
    to. Weights that do not fit its model_args (an edited file) are a one-line UserError."""
    args = {k: ckpt["model_args"][k] for k in (*MODEL_ARGS, *MODEL_OPTIONS) if k in ckpt["model_args"]}
    with torch.device("meta"):  # no random weights to make and then overwrite: the file's tensors become the model's
        model = GPT(GPTConfig(**{**args, "dropout": dropout}))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()},
                              assign=True)
        if not model.config.untied_head:
            model.transformer.wte.weight = model.lm_head.weight  # tied, as GPT() ties them
        if model.config.rotary:
            model.make_rotary_tables(model.lm_head.weight.device)  # made on the meta device above
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else first_line(e)
        raise UserError(f"the checkpoint's weights do not fit its model_args {args} ({short(detail, 160)}): the "
                        f"file was edited or damaged; use another checkpoint") from None
    return model


def load_base(base, dropout=0.0):
    """The base GPT a LoRA checkpoint's `lora.base` names, loaded as the run loaded it."""
    source = ModelSource.of_lora_base(base)
    if source.kind in (RUN, HF) and not Path(source.where).exists():
        raise UserError(f"this LoRA run's base model {source.where} is gone: the adapters apply to those weights only; "
                        f"put the base back there (and merge them with tools/merge_lora.py, which needs no base after)")
    ckpt, _ = source.load_checkpoint()
    if ckpt is not None and (ckpt.get("lora") or {}).get("base", {}).get("path") == source.where:
        raise UserError(f"this LoRA run's base {source.where} has been replaced by a LoRA checkpoint that names itself "
                        f"as its base: the base weights are gone; train the adapters again from a kept base")
    return source.model(ckpt, dropout=dropout)


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
