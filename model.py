"""GPT-2 language model, in one file.

Pre-LayerNorm transformer blocks (optional biases), causal self-attention through
torch's scaled_dot_product_attention, a 4x GELU MLP, and an output head tied to the token
embedding. Parameter names match nanoGPT and (after transposing Conv1D weights) Hugging Face
GPT-2, so checkpoints move between them.

Opt-in options from the modern speedruns (GPTConfig, all off by default, so a default model is nanoGPT's GPT-2):
rotary positions instead of learned ones, RMSNorm instead of LayerNorm, RMS-normalized queries and keys, a ReLU^2
MLP, an output head of its own, value embeddings added to each layer's values, and tanh soft-capped logits.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

GPT2_PADDED_VOCAB = 50304  # GPT-2's 50257 tokens padded up to a multiple of 64 for speed
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "mps")  # where torch has a fused AdamW kernel


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = GPT2_PADDED_VOCAB
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2; False is a bit faster and better
    # opt-in architecture options (MODEL_OPTIONS); a model with any of them is no longer GPT-2's architecture
    rotary: bool = False  # rotary position embeddings on queries and keys, no learned position embedding (wpe)
    rmsnorm: bool = False  # RMSNorm (a gain, no mean, no bias) instead of LayerNorm
    qk_norm: bool = False  # RMSNorm over each head's query and key before attention
    activation: str = "gelu"  # the MLP's: "gelu" (exact, GPT-2's) or "relu2" (relu(x)^2)
    untied_head: bool = False  # the output layer has its own weights (zero at start) instead of the token embedding's
    value_embeddings: bool = False  # each layer adds a per-token embedding (zero at start) to its attention values
    logit_softcap: float = 0.0  # > 0: logits = softcap * tanh(logits / softcap); 0 = off
    fast_cpu_attention: bool = True  # the CPU attention detours in attention(); not saved in checkpoints
    activation_checkpointing: bool = False  # recompute each block in the backward pass; not saved in checkpoints


MODEL_OPTIONS = {name: GPTConfig.__dataclass_fields__[name].default for name in (
    "rotary", "rmsnorm", "qk_norm", "activation", "untied_head", "value_embeddings", "logit_softcap")}  # each one's off value
ACTIVATIONS = ("gelu", "relu2")
ROPE_BASE = 10000.0


def model_options(config):
    """{option: value} of the architecture options config turns on (empty: GPT-2's architecture)."""
    return {k: getattr(config, k) for k, off in MODEL_OPTIONS.items() if getattr(config, k) != off}


def check_config(config):
    """ValueError (one line, with the fix) for a GPTConfig no GPT can be built from; train.py's config check calls it
    too (any object with these fields)."""
    if config.n_embd % config.n_head:
        fits = [h for h in range(1, 65) if config.n_embd % h == 0]
        raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}: each head needs "
                         f"n_embd/n_head dimensions; use an n_head from {fits} or change n_embd")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"activation={config.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if config.rotary and (config.n_embd // config.n_head) % 2:
        raise ValueError(f"rotary=True rotates pairs of dimensions and needs an even head size, and n_embd / n_head = "
                         f"{config.n_embd // config.n_head}: use an n_head that leaves an even head size")
    if not (isinstance(config.logit_softcap, (int, float)) and config.logit_softcap >= 0
            and math.isfinite(config.logit_softcap)):
        raise ValueError(f"logit_softcap={config.logit_softcap} must be 0 (off) or a positive number, e.g. 15")


def norm(config, size):
    return nn.RMSNorm(size, eps=1e-5) if config.rmsnorm else nn.LayerNorm(size, bias=config.bias)


def rotary_tables(pos, head_size):
    """cos and sin (..., T, head_size / 2) of each position's rotation angles pos * base^(-2i / head_size)."""
    inv_freq = ROPE_BASE ** -(torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angles = pos.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x, rope):
    """x (B, nh, T, hs) with each pair (x_i, x_{i + hs/2}) rotated by its position's angle: a query-key dot product
    then depends on the distance between their positions, not where they are."""
    cos, sin = rope
    if cos.dim() == 3:  # per-row positions (B, T, hs/2): documents packed in a row
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class CheapMaskDropout(torch.autograd.Function):
    """Dropout whose keep-mask comes from torch.rand (about twice as fast on CPU as the bernoulli_ behind
    F.dropout) and is saved as bool, as F.dropout saves it."""

    @staticmethod
    def forward(ctx, x, p):
        keep = torch.rand(x.shape, device=x.device) >= p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


def attention(q, k, v, mask=None, dropout_p=0.0, causal=True, fast_cpu=True):
    """Softmax attention of q (B, nh, T, hs) over k, v (B, nh, S, hs): causal, or as mask (B, 1, T, S) allows.

    Normally torch's scaled_dot_product_attention. On CPU (fast_cpu) two detours measure much faster with
    torch 2.13: bfloat16 attention, and any attention with dropout (which sends SDPA to its slow math path), are
    computed explicitly (explicit_attention); a bfloat16 query over the float32 KV cache runs SDPA in float32,
    because its CPU kernel is ~5x slower for a single query in bfloat16."""
    if fast_cpu and q.device.type == "cpu":
        if dropout_p > 0 or (q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16):
            return explicit_attention(q, k, v, mask, dropout_p, causal)
        if q.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   is_causal=causal and mask is None)
            return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None)


def explicit_attention(q, k, v, mask, dropout_p, causal):
    """softmax(q k^T / sqrt(hs) + bias) v in three batched ops, the bias (-inf where attention is not allowed) added
    inside the first matmul, with dropout masks from torch.rand (CheapMaskDropout). Forward and backward in bfloat16
    on CPU, this measured 1.75x faster than SDPA run in float32 (block 64), 5x faster than SDPA in bfloat16, and 1.8x
    faster than these ops with a float32 softmax (block 256, dropout 0.2)."""
    B, nh, T, hs = q.shape
    S = k.size(-2)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = bias.expand(B, nh, T, S).reshape(B * nh, T, S)
    else:
        bias = torch.full((T, S), float("-inf") if causal else 0.0, dtype=q.dtype, device=q.device).triu_(S - T + 1)
    att = torch.baddbmm(bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                        alpha=1.0 / math.sqrt(hs)).softmax(dim=-1)
    if dropout_p > 0:
        att = CheapMaskDropout.apply(att, dropout_p)
    return torch.bmm(att, v.reshape(B * nh, S, hs)).view(B, nh, T, hs)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental generation. Buffers for
    block_size positions are allocated on first use, so adding a token writes in place instead of copying.
    On CPU they are float32, the precision attention() runs in there, so they are not cast at every step."""

    def __init__(self, n_layer, block_size):
        self.keys, self.values = [None] * n_layer, [None] * n_layer
        self.block_size, self.length = block_size, 0

    def extend(self, layer, k, v):
        """Store k, v (B, nh, T, hs) after the cached positions; returns all keys and values so far."""
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            dtype = torch.float32 if k.device.type == "cpu" else k.dtype
            self.keys[layer] = k.new_empty(shape, dtype=dtype)
            self.values[layer] = v.new_empty(shape, dtype=dtype)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        if layer == len(self.keys) - 1:
            self.length = end  # every layer has stored this step's tokens
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class HeadNorm(nn.RMSNorm):
    """QK-norm's RMSNorm (same weight, same state_dict key), computed in float32 and returned in the input's dtype.
    Under bfloat16 autocast the query and key come out of a bf16 matmul while the gain is float32: torch's fused kernel
    refuses the pair (a UserWarning) and falls back to exactly this math, so the result is the same bit for bit."""

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        if config.qk_norm:
            self.q_norm = HeadNorm(config.n_embd // config.n_head, eps=1e-5)
            self.k_norm = HeadNorm(config.n_embd // config.n_head, eps=1e-5)
        self.config = config  # shared with the model: config.fast_cpu_attention can be switched on it

    def forward(self, x, mask=None, cache=None, layer=0, rope=None, ve=None):
        """mask: None for plain causal attention, else a (B, 1, T, T) bool mask (True = may attend).
        cache: a KVCache whose keys and values for `layer` are extended with this call's tokens.
        rope: (cos, sin) tables of the tokens' positions (rotary); ve: (B, T, C) value embeddings added to v."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
        if ve is not None:
            v = v + ve.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        causal = True
        if cache is not None:
            causal = cache.length == 0  # a prompt attends causally; one new token attends to everything before it
            k, v = cache.extend(layer, k, v)
        dropout = self.attn_dropout if self.training else 0.0
        y = attention(q, k, v, mask, dropout, causal, self.config.fast_cpu_attention)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU() if config.activation == "gelu" else ReLU2()  # nanoGPT's name, whichever it is
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class ReLU2(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, layer=0, rope=None, ve=None):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, rope, ve)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rotary:
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.value_embeddings:  # outside the blocks (".h."), so Muon leaves these embeddings to AdamW
            parts["ve"] = nn.ModuleList([nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.n_layer)])
        self.transformer = nn.ModuleDict(dict(
            **parts,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.rotary:
            self.make_rotary_tables(self.lm_head.weight.device)
        if not config.untied_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two residual adds per layer
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # options that start as no change: the model first learns as without them (modded-nanogpt zeroes its head)
        if config.untied_head:
            torch.nn.init.zeros_(self.lm_head.weight)
        for table in self.transformer.ve if config.value_embeddings else ():
            torch.nn.init.zeros_(table.weight)

    def make_rotary_tables(self, device):
        """Every position's cos and sin (float32 buffers, not saved: a function of the config), made once on device:
        torch.compile would otherwise recompute them inside every layer's fused rotation, forward and backward. A model
        built on the meta device calls this again once its weights are loaded."""
        # computed on the CPU wherever the model lives: a run built on the CPU and a resume loaded straight onto a GPU
        # get the same tables bit for bit (a GPU's cos may differ in the last bit), so the resume stays exact
        cos, sin = rotary_tables(torch.arange(self.config.block_size, device="cpu"),
                                 self.config.n_embd // self.config.n_head)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count. The position embedding is left out by default; the token embedding
        is counted once because it is shared with lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, doc_sep=None, kv_cache=None, layout=None):
        """Logits (and the loss when targets are given). With doc_sep (an end-of-text token id), each row may
        hold several documents: positions restart after every doc_sep and attention stays inside a document.
        With kv_cache, idx continues the tokens already in the cache. layout = (positions (B, T), mask (B, 1, T, T),
        keep (B, T) bool) gives each token its position and what it may attend to (a shared context followed by
        several continuations of it, each attending to the context and to itself): the logits (N, vocab) of the
        positions keep marks come back, in row order."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if layout is not None:
            pos, mask, keep = layout
            if int(pos.max()) >= self.config.block_size:
                raise ValueError(f"position {int(pos.max())} is past block_size {self.config.block_size}")
        elif start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        elif doc_sep is None:
            pos, mask = torch.arange(start, start + T, dtype=torch.long, device=idx.device), None
        else:
            pos, mask = document_positions_and_mask(idx, doc_sep)
        cfg = self.config
        x = self.transformer.wte(idx)
        rope = None
        if cfg.rotary:
            rope = self.rope_cos[pos], self.rope_sin[pos]
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        checkpointing = cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            ve = self.transformer.ve[i](idx) if cfg.value_embeddings else None
            if checkpointing:  # keep only the block's input; its activations are recomputed (same dropout masks)
                x = torch.utils.checkpoint.checkpoint(block, x, mask, kv_cache, i, rope, ve, use_reentrant=False)
            else:
                x = block(x, mask, kv_cache, i, rope, ve)
        x = self.transformer.ln_f(x)
        if targets is None and layout is None:
            return self.softcap(self.lm_head(x[:, [-1], :])), None  # generation needs only the last position
        if targets is None:
            return self.softcap(self.lm_head(x[keep])), None
        logits = self.softcap(self.lm_head(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def softcap(self, logits):
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def grow_vocabulary(self, vocab_size):
        """More rows for the (tied) token embedding and output layer: new tokens (a chat template's) start at the mean
        of the existing rows, so at first they look like an average token rather than a random one."""
        def grown(old):
            new = torch.empty(vocab_size, old.size(1), device=old.device, dtype=old.dtype)
            new[:old.size(0)] = old
            new[old.size(0):] = old.mean(dim=0)
            return nn.Parameter(new)
        self.transformer.wte.weight = grown(self.transformer.wte.weight.data)
        self.transformer.wte.num_embeddings = vocab_size
        self.lm_head.weight = self.transformer.wte.weight if not self.config.untied_head else grown(self.lm_head.weight.data)
        self.lm_head.out_features = vocab_size
        for table in self.transformer.ve if self.config.value_embeddings else ():
            table.weight = grown(table.weight.data)
            table.num_embeddings = vocab_size
        self.config.vocab_size = vocab_size

    def crop_block_size(self, block_size):
        """Shrink the context window, e.g. to fine-tune GPT-2 (1024) with a smaller block_size."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} is larger than the model's {self.config.block_size}: "
                             f"a context window can only be cropped")
        self.config.block_size = block_size
        if "wpe" in self.transformer:  # rotary positions need no cropping
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*H*Q*T. A frozen weight (LoRA's
        base) takes 4, not 6: its backward passes the gradient on but computes none for the weight."""
        cfg = self.config
        lookups = ("transformer.wpe.weight", "transformer.ve.")  # embeddings are lookups: no matmul FLOPs
        if cfg.untied_head:  # else the shared weight counts once, as the head's matmul
            lookups += ("transformer.wte.weight",)
        n_matmul = sum(p.numel() for name, p in self.named_parameters() if not name.startswith(lookups))
        frozen = sum(p.numel() for name, p in self.named_parameters()
                     if not p.requires_grad and not name.startswith(lookups))
        attention = 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len
        return 6 * n_matmul - 2 * frozen + attention

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None):
        """AdamW with weight decay on 2-D tensors only (matmul weights, embeddings), not on biases or
        LayerNorm gains. Groups are ordered [decay, no_decay] as nanoGPT, so optimizer states match."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:
            fused = device_type in FUSED_ADAMW_DEVICES
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True, **controls):
        """idx (B, T) followed by max_new_tokens sampled tokens (see stream; a row that met a stop token is filled
        with it from then on, and generation ends early when every row has)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, kv_cache, **controls)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True, *, top_p=None, min_p=None,
               repetition_penalty=1.0, stop_tokens=(), generator=None):
        """Sample max_new_tokens after idx (B, T), yielding each new (B, 1) token as soon as it is drawn (sample_next
        says how: temperature 0 is greedy; top_k, top_p, min_p and repetition_penalty as in transformers). A row
        that draws one of stop_tokens is done: it repeats that token, and the stream ends once every row is done.
        generator: the torch.Generator the draws come from (None: torch's global one), so that several streams
        interleaved in one process each depend on their own seed only.

        Without kv_cache every token runs the whole context (its last block_size tokens) through the model.
        With it, only the new token runs, against cached keys and values: the same tokens while the sequence
        fits in block_size. When the positions run out, the cache is rebuilt from the last block_size // 2
        tokens, so from then on the context is the most recent half to full block."""
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repetition_penalty=repetition_penalty)
        block_size = self.config.block_size
        stops = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        controls = dict(top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        cache = KVCache(self.config.n_layer, block_size) if kv_cache else None
        logits, _ = self(idx[:, -block_size:], kv_cache=cache)
        for i in range(max_new_tokens):
            token = sample_next(logits[:, -1, :], temperature, top_k, previous=idx, generator=generator, **controls)
            if len(stops):
                token = torch.where(done, idx[:, -1:], token)  # a finished row repeats its stop token
                done |= torch.isin(token, stops)
            idx = torch.cat((idx, token), dim=1)
            yield token
            if i == max_new_tokens - 1 or (len(stops) and bool(done.all())):
                break
            if not kv_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache.length == block_size:
                cache.length = 0  # rebuild the cache over the last half block, in the same buffers
                logits, _ = self(idx[:, -(block_size // 2):], kv_cache=cache)
            else:
                logits, _ = self(token, kv_cache=cache)

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """GPT-2 weights from Hugging Face (needs the `transformers` package, and a download on first use)."""
        from transformers import GPT2LMHeadModel
        hf_model = GPT2LMHeadModel.from_pretrained(model_type)
        model = cls(config_from_hf(hf_model.config, **(override_args or {})))
        model.load_state_dict(state_dict_from_hf(hf_model.state_dict()))
        return model


GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def document_positions_and_mask(idx, doc_sep):
    """For rows of packed documents: each token's position inside its own document (B, T), and the
    block-diagonal causal mask (B, 1, T, T) that lets a token attend only to earlier tokens of its document.
    A doc_sep token ends (belongs to) the document before it."""
    B, T = idx.size()
    is_sep = (idx == doc_sep).long()
    doc = torch.cumsum(is_sep, dim=1) - is_sep  # document number of each token
    t = torch.arange(T, device=idx.device).expand(B, T)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # where each token's document begins
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return t - first, mask[:, None, :, :]


REPETITION_PENALTY_RANGE = (1e-6, 1e6)  # beyond it the penalized logits leave what float32 holds


def check_sampling(*, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0):
    """Refuse sampling controls that cannot work (ValueError, one line naming the control and its range): the same
    checks for sample.py, the chat and any caller of generate."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be 0 (greedy) or positive (and finite)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k={top_k} must be 0 (off) or a positive whole number")
    if top_p is not None and (not number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p} must be in (0, 1]: the share of the probability to sample from (1 = all)")
    if min_p is not None and (not number(min_p) or not 0 <= min_p < 1):
        raise ValueError(f"min_p={min_p} must be in [0, 1): a fraction of the likeliest token's probability")
    low, high = REPETITION_PENALTY_RANGE
    if not number(repetition_penalty) or not low <= repetition_penalty <= high:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be positive, between {low:g} and {high:g} (1 = "
                         f"off, above 1 discourages repeats)")


def sample_next(logits, temperature=1.0, top_k=None, *, top_p=None, min_p=None, repetition_penalty=1.0, previous=None,
                generator=None):
    """One token per row from final-position logits (B, vocab): the most likely one at temperature 0 (greedy), else
    a draw from the distribution that filter_logits leaves."""
    logits = filter_logits(logits, temperature, top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, previous=previous)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(logits, dim=-1)
    # inverse-CDF sampling: the same distribution as torch.multinomial, several times cheaper per call on CPU
    u = torch.rand(probs.size(0), 1, device=probs.device, dtype=probs.dtype, generator=generator)
    return torch.searchsorted(probs.cumsum(dim=-1), u).clamp_(max=probs.size(-1) - 1)


def filter_logits(logits, temperature=1.0, top_k=None, *, top_p=None, min_p=None, repetition_penalty=1.0,
                  previous=None):
    """Final-position logits (B, vocab) as float32, in transformers' order: the repetition penalty (a token already in
    `previous` (B, T) has a positive logit divided by it, a negative one multiplied), then the temperature (0 leaves
    them: greedy takes the largest, which no filter removes), top-k, top-p (the fewest tokens whose probabilities add
    up to top_p) and min-p (tokens at least min_p times as likely as the likeliest); a dropped token gets -inf."""
    logits = logits.float()
    if repetition_penalty != 1.0 and previous is not None:
        seen = torch.gather(logits, 1, previous)
        logits = logits.scatter(1, previous, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if temperature == 0:
        return logits
    if temperature < 1e-4:  # in float32 the quotient would overflow (NaN after softmax): the sharp limit, in float64
        logits = (logits - logits.max(dim=-1, keepdim=True).values).double() / temperature
    else:
        logits = logits / temperature
    if top_k and top_k < logits.size(-1):  # top-k of the whole vocabulary keeps everything
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the probability of the likelier tokens: the first is always kept
        keep = before < top_p
        keep[:, 0] = True  # also when top_p is below what float32 holds
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, ~keep)
        logits = logits.masked_fill(drop, -float("inf"))
    if min_p:
        probs = F.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, -float("inf"))
    return logits


def config_from_hf(hf_config, dropout=0.0):
    """GPTConfig for a transformers GPT2Config (GPT-2 always has biases)."""
    return GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size, n_layer=hf_config.n_layer,
                     n_head=hf_config.n_head, n_embd=hf_config.n_embd, dropout=dropout, bias=True)


def state_dict_from_hf(hf_state):
    """Rename nothing, transpose the Conv1D weights HF uses where we use Linear, drop the attention-mask buffers."""
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for k, v in hf_state.items():
        if k.endswith(".attn.masked_bias") or k.endswith(".attn.bias"):
            continue
        out[k] = v.t() if k.endswith(transposed) else v
    return out
