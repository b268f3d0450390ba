"""The optimizer a run trains with: nanoGPT's AdamW, or Muon for the transformer blocks' 2-D weights with AdamW for
the rest (embeddings, the tied head, biases, LayerNorm gains), as the modded-nanogpt speedrun records do. The model
is the same either way, so checkpoints stay nanoGPT-compatible; only the optimizer state differs."""
import math

import torch


def muon_parameters(model):
    """The 2-D weights inside the transformer blocks (attention and MLP matrices): what Muon orthogonalizes."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and ".h." in f".{name}"]


class MuonAdamW:
    """Muon and AdamW stepped together, looking like one optimizer to the training loop, the GradScaler and the
    checkpoint: param_groups are Muon's then AdamW's (setting a group's lr reaches the optimizer that owns it), and
    state_dict numbers the parameters across both, in that order."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        n = sum(len(g["params"]) for g in muon["param_groups"])
        groups = [dict(g, kind="muon") for g in muon["param_groups"]]
        groups += [dict(g, kind="adamw", params=[i + n for i in g["params"]]) for g in adamw["param_groups"]]
        return {"state": {**muon["state"], **{i + n: s for i, s in adamw["state"].items()}}, "param_groups": groups}

    def load_state_dict(self, state):
        groups = state["param_groups"]
        kinds = [g.get("kind") for g in groups]
        if kinds != ["muon"] * len(self.muon.param_groups) + ["adamw"] * len(self.adamw.param_groups):
            raise ValueError("the optimizer state is not a Muon + AdamW state of this model")
        n = sum(len(g["params"]) for g in groups if g["kind"] == "muon")
        strip = [{k: v for k, v in g.items() if k != "kind"} for g in groups]
        state_of = {int(i): s for i, s in state["state"].items()}
        self.muon.load_state_dict({"state": {i: s for i, s in state_of.items() if i < n},
                                   "param_groups": strip[:len(self.muon.param_groups)]})
        self.adamw.load_state_dict({
            "state": {i - n: s for i, s in state_of.items() if i >= n},
            "param_groups": [dict(g, params=[i - n for i in g["params"]]) for g in strip[len(self.muon.param_groups):]]})
        # a group's settings come back as saved: a checkpoint from before the AdamW here was fused says fused=None
        # (torch's unfused path, whose threads could disagree); this optimizer's own choice stands
        fused = self.adamw.defaults["fused"]
        for group in self.adamw.param_groups:
            group["fused"] = fused
            for p in group["params"] if fused else ():
                if "step" in self.adamw.state.get(p, {}):  # the fused kernel wants the step beside its parameter
                    self.adamw.state[p]["step"] = self.adamw.state[p]["step"].to(p.device, torch.float32)


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyperparameters, state and update) whose Newton-Schulz iteration runs in ns_dtype.
    torch's always runs it in bfloat16, which CPUs without bf16 in hardware multiply ~100x slower than float32
    (a recipe step went from 66 ms to 855 ms on a Zen 3)."""

    def __init__(self, params, *, ns_dtype=torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            updates = []
            for grad, buf in zip(grads, buffers):
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
            # matrices of one shape are orthogonalized together, a tall one (A > B) as its transpose (the iteration
            # works on it so anyway): the MLP's (4C, C) and (C, 4C) share one batch. A few batched matmuls instead of
            # many small ones (in bf16 on AVX512/AMX each matrix's result is bit for bit what it gets alone)
            by_shape = {}
            for i, u in enumerate(updates):
                by_shape.setdefault(tuple(sorted(u.shape)), []).append(i)
            for idx in by_shape.values():
                wide = [updates[i].mT if updates[i].size(0) > updates[i].size(1) else updates[i] for i in idx]
                ortho = orthogonalize(torch.stack(wide), group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      self.ns_dtype)
                for i, o in zip(idx, ortho):
                    A, B = params[i].shape
                    scale = 0.2 * math.sqrt(max(A, B)) if group["adjust_lr_fn"] == "match_rms_adamw" else math.sqrt(max(1, A / B))
                    params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_((o.mT if A > B else o).to(params[i].dtype), alpha=-lr * scale)


def orthogonalize(grads, coefficients, steps, eps, dtype):
    """Muon's quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix (as torch.optim.Muon), for
    a stack of same-shaped matrices (k, A, B) at once."""
    a, b, c = coefficients
    x = grads.to(dtype)
    tall = grads.size(1) > grads.size(2)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_with_adamw(model, *, weight_decay, learning_rate, betas, fused, ns_dtype=torch.bfloat16):
    """Muon (Moonshot's learning-rate adjustment, which makes its update as large as AdamW's, so the same learning
    rate and schedule serve both; Newton-Schulz in ns_dtype) for muon_parameters; AdamW, with nanoGPT's groups, for
    every other parameter."""
    hidden = muon_parameters(model)
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    muon = Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype)
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=learning_rate, betas=betas, fused=fused)
    return MuonAdamW(muon, adamw)
