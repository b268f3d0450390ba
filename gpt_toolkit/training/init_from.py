"""The model a run starts from, by its source (source.ModelSource: a fresh one, a resumed run's, another run's best
weights, OpenAI's GPT-2 or a transformers directory): build_model, and the checks made before building it: a resume
against its checkpoint, the tokenizer of fine-tuned weights against the data's, the memory the run needs."""
import dataclasses

from gpt_toolkit.core import hardware
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.tokenizer import GPT2_VOCAB_SIZE, describe, same_vocabulary, strip_chat, vocabulary_of
from gpt_toolkit.models import lora, memory
from gpt_toolkit.models.checkpoint import ARCHITECTURE, architecture, model_args_of
from gpt_toolkit.models.huggingface import hf_dir_model_args
from gpt_toolkit.models.source import HF, RESUME, RUN, SCRATCH
from model import GPT, GPT2_PADDED_VOCAB, GPT2_SIZES, MODEL_OPTIONS, GPTConfig, model_options


def scratch_model_args(cfg, vocab_size):
    """GPTConfig fields of a fresh model with cfg's architecture: what init_from=scratch trains."""
    return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size, bias=cfg.bias,
                vocab_size=vocab_size, dropout=cfg.dropout, **model_options(cfg))


def planned_model_args(cfg, source, dataset, ckpt):
    """The GPTConfig fields build_model will use, known before building it (ckpt: the checkpoint it comes from, when
    resuming or starting from another run)."""
    if source.kind == SCRATCH:
        return scratch_model_args(cfg, dataset.model_vocab_size)
    if source.kind == RESUME:
        return {**ckpt["model_args"], "dropout": cfg.dropout}
    if source.kind == RUN:  # another run's model: grown for a chat dataset's tokens, its context maybe cropped
        args = ckpt["model_args"]
        return {**args, "dropout": cfg.dropout, "vocab_size": max(args["vocab_size"], dataset.vocab_size or 0),
                "block_size": min(cfg.block_size, args["block_size"])}
    if source.kind == HF:
        args = hf_dir_model_args(source.where, cfg.dropout)
        return {**args, "block_size": min(cfg.block_size, args["block_size"])}
    return dict(GPT2_SIZES[source.where], block_size=min(cfg.block_size, 1024), bias=True, vocab_size=GPT2_VOCAB_SIZE,
                dropout=cfg.dropout)


def check_resume(ckpt, cfg, cli_keys, dataset):
    """A resume continues the run in the checkpoint: refuse flags and data that contradict it. Returns cfg with the
    checkpoint's architecture and optimizer (so the log and the saved config tell the truth)."""
    if not isinstance(ckpt.get("optimizer"), dict) or not isinstance(ckpt.get("iter_num"), int):
        raise UserError("the checkpoint has no optimizer state or step (it holds weights only, or was edited): a resume "
                        "continues a run from the latest.pt it saved; to start a new run from these weights, export "
                        "them with tools/export_hf.py and pass --init_from=THAT_DIR")
    args = ckpt["model_args"]
    for key in ARCHITECTURE:
        if key in cli_keys and getattr(cfg, key) != architecture(args, key):
            raise UserError(f"checkpoint has {key}={architecture(args, key)} but --{key}={getattr(cfg, key)} was given: "
                            f"drop --{key} to resume this run, or train a new model in another --out_dir")
    trained_with = ckpt.get("config", {}).get("optimizer", "adamw")
    if "optimizer" in cli_keys and cfg.optimizer != trained_with:
        raise UserError(f"checkpoint was trained with optimizer={trained_with} but --optimizer={cfg.optimizer} was given: "
                        f"drop --optimizer to resume this run, or start a new one in another --out_dir")
    trained_on = ckpt.get("config", {}).get("dataset")
    if trained_on and trained_on != cfg.dataset:
        raise UserError(f"checkpoint was trained on dataset '{trained_on}' but this run uses '{cfg.dataset}': "
                        f"resume with --dataset={trained_on}, or start a new run in another --out_dir")
    if ckpt.get("meta") is not None and dataset.meta is not None and not same_vocabulary(ckpt["meta"], dataset.meta):
        raise UserError(f"the checkpoint's tokenizer ({describe(ckpt['meta'])}) is not dataset '{cfg.dataset}''s "
                        f"({describe(dataset.meta)}): was the data prepared again, or with another tokenizer? resume on "
                        f"the data the model was trained on")
    lora_keys = check_resume_lora(ckpt, cfg, cli_keys)
    return dataclasses.replace(cfg, optimizer=trained_with, **{key: architecture(args, key) for key in ARCHITECTURE},
                               **lora_keys)


# How the run learns: a resume takes these from its command, as nanoGPT's does, so a config file or flag that differs
# from the run's own changes the run it continues; resume_differences says which.
LEARNING_KEYS = ("batch_size", "gradient_accumulation_steps", "dropout", "learning_rate", "min_lr", "warmup_iters",
                 "lr_decay_iters", "decay_lr", "lr_schedule", "decay_frac", "weight_decay", "beta1", "beta2",
                 "grad_clip", "mask_prob", "packing", "padding", "max_train_tokens", "seed")


def resume_differences(ckpt, cfg):
    """Lines for the log: the command's learning settings (cfg, before check_resume) that differ from the run's, and
    an optimizer the command names that the run keeps its own instead of (its state belongs to it)."""
    run = ckpt.get("config", {})
    changed = [f"{key} {run[key]!r} -> {getattr(cfg, key)!r}" for key in LEARNING_KEYS
               if key in run and run[key] != getattr(cfg, key)]
    notes = []
    if changed:
        notes.append(f"resuming with settings that differ from the run's: {', '.join(changed)} (a resume takes these "
                     f"from its command: give the run's own values to continue it exactly)")
    trained_with = run.get("optimizer", "adamw")
    if cfg.optimizer != trained_with:
        notes.append(f"resuming with the run's optimizer={trained_with}, not the command's {cfg.optimizer} (its state "
                     f"belongs to the run)")
    return notes


def check_resume_lora(ckpt, cfg, cli_keys):
    """A resume keeps its run's LoRA settings (none for a full fine-tune): refuse flags that change them, and return
    the checkpoint's as Config keys."""
    info = ckpt.get("lora")
    trained = {"lora_rank": info["rank"], "lora_alpha": info["alpha"], "lora_dropout": info["dropout"],
               "lora_targets": ",".join(info["targets"])} if info else {"lora_rank": 0}
    def same(key):
        if key == "lora_targets":  # the same matrices, however they are written
            return set(lora.parse_targets(cfg.lora_targets)) == set(info["targets"])
        return getattr(cfg, key) == trained[key]
    for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
        if key in cli_keys and key in trained and not same(key):
            raise UserError(f"checkpoint was trained with {key}={trained[key]} but --{key}={getattr(cfg, key)} was "
                            f"given: drop --{key} to resume this run, or start a new one in another --out_dir")
    return trained


def check_init_tokenizer(cfg, source, dataset, init_ckpt=None):
    """Fine-tuning weights (gpt2*, a transformers directory, another run's checkpoint init_ckpt) on a dataset needs
    the dataset in their tokenizer (a chat dataset: with the chat tokens added to it): a one-line error naming both
    otherwise (a model would learn ids that mean other text to it)."""
    if not source.fine_tunes or dataset.meta is None:
        return
    if init_ckpt is not None:
        model_vocab = init_ckpt.get("meta")
    else:
        model_vocab = vocabulary_of(source.tokenizer()) if source.kind == HF else None
    if dataset.is_chat:
        same = same_vocabulary(strip_chat(model_vocab or {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE}),
                               strip_chat(dataset.vocabulary))
    else:
        same = same_vocabulary(model_vocab, dataset.vocabulary)
    if not same:
        raise UserError(f"init_from={source} has the tokenizer {describe(model_vocab)}, and dataset '{cfg.dataset}' "
                        f"was prepared with {describe(dataset.vocabulary)}: prepare the data with the model's tokenizer "
                        f"(data/prepare_text.py --tokenizer=...), or train a new model on this dataset")


def check_memory(cfg, source, dataset, ckpt, world):
    """Refuse a run that cannot fit before the model is built (building it alone can take minutes or fail); world:
    train.py's World (device, dtype, processes)."""
    device, dtype, world_size = world.device, world.dtype, world.size
    args = planned_model_args(cfg, source, dataset, ckpt)
    shape = dataclasses.replace(cfg, **{k: v for k, v in args.items() if k != "vocab_size"})
    n_params = memory.param_count(n_layer=args["n_layer"], n_embd=args["n_embd"], block_size=args["block_size"],
                                  vocab_size=args["vocab_size"], bias=args["bias"], n_head=args["n_head"],
                                  options={k: architecture(args, k) for k in MODEL_OPTIONS})
    sharing = memory.processes_on_this_machine() if hardware.device_type(device) == "cpu" else 1
    if cfg.parallel == "fsdp" and world_size > 1:
        n_params = -(-n_params // world_size)  # each process holds its shard of the weights and their state
    memory.check_fits(shape, n_params=n_params, vocab_size=args["vocab_size"], dtype=dtype, device=device,
                      processes=min(sharing, world_size))


def build_model(cfg, source, dataset, ckpt):
    """(model, model_args, notes to log) from the run's source; ckpt: its loaded checkpoint (resume, another run)."""
    notes = []
    if source.kind == SCRATCH:
        if dataset.vocab_size is None:
            notes.append(f"no vocabulary file in the dataset: using GPT-2's vocab_size {GPT2_PADDED_VOCAB} "
                         f"({GPT2_VOCAB_SIZE} padded to a multiple of 64)")
        model_args = scratch_model_args(cfg, dataset.model_vocab_size)
        model = GPT(GPTConfig(**model_args))
    else:  # a LoRA run's resume: its base again, with the adapters unmerged
        if source.kind == RUN:
            notes.append(f"initializing from the run in {source} (its weights at step {ckpt.get('iter_num', '?')}; a "
                         f"new optimizer and schedule)")
        elif source.pretrained:
            notes.append(f"initializing from {'the Hugging Face model in' if source.kind == HF else 'OpenAI GPT-2 weights:'} "
                         f"{source}")
        model = source.model(ckpt, dropout=cfg.dropout, adapters=source.resumes)
        model_args = model_args_of(model.config)
    model.config.fast_cpu_attention = cfg.fast_cpu_attention
    base_print = lora.fingerprint(model.state_dict()) if cfg.lora_rank and not source.resumes else None
    if dataset.is_chat and not source.scratch and dataset.vocab_size > model_args["vocab_size"]:
        grown = dataset.vocab_size - model_args["vocab_size"]
        model.grow_vocabulary(dataset.vocab_size)
        model_args["vocab_size"] = dataset.vocab_size
        notes.append(f"the chat tokens need {grown} more rows than the model's token embedding has: grown to "
                     f"{dataset.vocab_size}, the new rows starting at the mean of the others")
    if dataset.vocab_size is not None and dataset.vocab_size > model_args["vocab_size"]:
        raise UserError(f"dataset '{cfg.dataset}' has {dataset.vocab_size} tokens but the model's vocab_size is "
                        f"{model_args['vocab_size']}: use a dataset with the model's tokenizer")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
        model_args["block_size"] = cfg.block_size
    elif cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} is larger than the model's {model.config.block_size}: "
                        f"use --block_size={model.config.block_size} or less")
    if base_print is not None:
        notes.append(add_adapters(model, cfg, source, dataset, base_print))
    return model, model_args, notes


def add_adapters(model, cfg, source, dataset, base_print):
    """Freeze model and give it cfg's LoRA adapters (and trained rows for the chat tokens the base never saw);
    model.lora describes them and the base for the checkpoints. Returns a line for the log."""
    settings = lora.LoRASettings.of(cfg)
    highest = lora.max_rank(model, settings.targets)
    if settings.rank > highest:
        raise UserError(f"lora_rank={settings.rank} is above the smallest dimension of the matrices it adapts ({highest}, "
                        f"the base's n_embd): such an update is not low-rank and costs more than the matrix itself; use "
                        f"--lora_rank={max(1, min(64, highest // 4))} or another value up to {highest}")
    token_ids = lora.chat_token_ids(dataset.meta) if dataset.is_chat else []
    if token_ids and model.config.untied_head:
        raise UserError(f"LoRA on chat data trains the rows of the {len(token_ids)} chat tokens in the embedding the "
                        f"output layer shares, and this base was trained with untied_head=True: fine-tune it fully "
                        f"(drop --lora_rank), or use LoRA on a base with a tied head")
    matrices = lora.add_lora(model, settings, token_ids=token_ids)
    model.lora = {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
                  "targets": list(settings.targets), "token_ids": token_ids,
                  "base": {**source.base_record(), "fingerprint": base_print}}
    rows = f" and the embedding rows of the {len(token_ids)} chat tokens" if token_ids else ""
    return (f"LoRA {lora.describe(model.lora)} ({len(matrices)} matrices){rows}: the base weights from "
            f"{source} are frozen")
