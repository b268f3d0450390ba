"""LoRA (Hu et al. 2021): fine-tune a trained GPT by training small low-rank updates of its block matrices while its
own weights stay frozen: W x + (alpha / r) B A x, with A (r x in) random and B (out x r) zero, so the first forward is
the base model's.

A LoRA run's checkpoint holds the adapters only (and their optimizer state), with `lora` naming the base they apply to
and its weights' fingerprint; gpt_toolkit.models.source puts them back on that base (or refuses a base that changed).
Chat data adds tokens the base never learned: their rows of the (tied) token embedding train too, as extra
parameters (peft's trainable tokens), the rest of the embedding frozen.
"""
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpt_toolkit.core.config import BLOCK_LINEARS, parse_targets
from model import GPT

DEFAULT_TARGETS = "c_attn,c_proj,c_fc"  # every matrix of every block (QLoRA: all of them, to match full fine-tuning)
ADAPTER_MARKS = (".lora_A", ".lora_B", "lora_token_rows.")
SHAPES = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}  # (in, out) / n_embd


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple  # names or name endings of BLOCK_LINEARS

    @classmethod
    def of(cls, cfg):
        return cls(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=parse_targets(cfg.lora_targets))

    @property
    def scaling(self):
        return self.alpha / self.rank


def param_count(*, n_layer, n_embd, rank, targets):
    """The adapters' parameters for a model of this shape (what a LoRA run trains, chat token rows aside)."""
    wanted = [name for name in BLOCK_LINEARS if targeted(f"transformer.h.0.{name}", targets)]
    return n_layer * sum(rank * (SHAPES[name][0] + SHAPES[name][1]) * n_embd for name in wanted)


def targeted(name, targets):
    """Whether the module `name` (transformer.h.3.attn.c_attn) is one the targets name."""
    inside = name.split(".", 3)[-1] if name.startswith("transformer.h.") else None
    return inside in BLOCK_LINEARS and any(inside == t or inside.endswith("." + t) for t in targets)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (its weight and bias under their own names, so the base's keys are unchanged) plus a trained
    low-rank update scaling * B @ A, A initialised as peft and nn.Linear do (Kaiming uniform), B at zero."""

    def __init__(self, base, *, rank, alpha, dropout):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def delta(self):
        """The update as a matrix: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class TokenRows(nn.Module):
    """Trained rows of the tied token embedding and output layer for the token ids `ids` (a chat template's tokens,
    new to the base), over the frozen matrix."""

    def __init__(self, weight, ids):
        super().__init__()
        self.register_buffer("ids", torch.tensor(sorted(ids), dtype=torch.long, device=weight.device))
        self.rows = nn.Parameter(weight.detach()[self.ids].clone())
        lookup = torch.full((weight.size(0),), -1, dtype=torch.long, device=weight.device)
        lookup[self.ids] = torch.arange(len(self.ids), device=weight.device)
        self.register_buffer("lookup", lookup, persistent=False)

    def embed(self, idx, weight):
        where = self.lookup[idx]
        rows = self.rows.to(weight.dtype)[where.clamp(min=0)]
        return torch.where((where >= 0).unsqueeze(-1), rows, F.embedding(idx, weight))

    def logits(self, x, weight):
        return F.linear(x, weight).index_copy(-1, self.ids, F.linear(x, self.rows.to(x.dtype)))


class RowsEmbedding(nn.Module):
    """The token embedding with TokenRows' rows in place of the frozen ones."""

    def __init__(self, embedding, rows):
        super().__init__()
        self.weight = embedding.weight
        object.__setattr__(self, "_rows", rows)  # registered once, on the model, not under wte and lm_head too

    def forward(self, idx):
        return self._rows.embed(idx, self.weight)


class RowsHead(nn.Module):
    """The (tied) output layer with TokenRows' rows in place of the frozen ones."""

    def __init__(self, head, rows):
        super().__init__()
        self.weight = head.weight
        object.__setattr__(self, "_rows", rows)

    def forward(self, x):
        return self._rows.logits(x, self.weight)


def max_rank(model, targets):
    """The highest useful rank on model's targeted matrices: the smallest dimension among them (a rank above it adds
    no expressive power, only cost: more parameters than the matrix itself)."""
    return min(min(m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and targeted(name, targets))


def add_lora(model, settings, *, token_ids=()):
    """Freeze every weight of model and put adapters on the targeted matrices (and trained rows for token_ids).
    Returns the names of the adapted matrices."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and targeted(name, settings.targets)]
    for name in names:
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank=settings.rank, alpha=settings.alpha,
                                         dropout=settings.dropout))
    if token_ids:
        model.lora_token_rows = TokenRows(model.lm_head.weight, token_ids)
        model.transformer.wte = RowsEmbedding(model.transformer.wte, model.lora_token_rows)
        model.lm_head = RowsHead(model.lm_head, model.lora_token_rows)
    return names


def is_adapter_key(key):
    return any(mark in key for mark in ADAPTER_MARKS)


def adapters_only(state_dict):
    """The adapters' part of a LoRA model's state dict: what its checkpoints hold."""
    return {k: v for k, v in state_dict.items() if is_adapter_key(k)}


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_state_dict(model):
    """A plain GPT's state dict with the adapters folded in (W + scaling * B A; the trained token rows written into
    the tied embedding), in the base's dtype."""
    state = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k) and not k.endswith(".lookup")}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            w = module.weight.detach()
            state[f"{name}.weight"] = (w.float() + module.delta().detach()).to(w.dtype)
    rows = getattr(model, "lora_token_rows", None)
    if rows is not None:
        w = state["lm_head.weight"].clone()
        w[rows.ids] = rows.rows.detach().to(w.dtype)
        state["lm_head.weight"] = state["transformer.wte.weight"] = w
    return state


def fingerprint(state_dict):
    """sha256 of a model's weights (names, dtypes, shapes and bytes): what a LoRA run checks its base against."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def describe(lora):
    """One line for the log: what trains and what share of the model that is."""
    return f"rank {lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])}"


def chat_token_ids(meta):
    """The ids a chat vocabulary adds to its base's (their rows are new to a base model, so a LoRA run trains them)."""
    chat = (meta or {}).get("chat")
    if not chat:
        return []
    return sorted(i for i in chat["special_tokens"].values() if i >= chat["base_vocab_size"])


def merged_model(model):
    """A plain GPT equal to the LoRA model (adapters folded in): what sampling, evaluation and exports run."""
    from gpt_toolkit.models.checkpoint import model_args_of
    from model import GPTConfig
    plain = GPT(GPTConfig(**model_args_of(model.config)))
    plain.load_state_dict(merged_state_dict(model))
    plain.config.fast_cpu_attention = model.config.fast_cpu_attention
    return plain
