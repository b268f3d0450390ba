"""FSDP (--parallel=fsdp): PyTorch's FSDP2 (fully_shard) shards parameters, gradients and AdamW state across the
torchrun processes, one unit per transformer block plus the root. Checkpoints stay in the one format every other run
writes (full tensors, nanoGPT's keys): the shards are gathered for a save and cut again on resume."""
import sys

import torch
import torch.distributed as dist


def is_sharded(t):
    """True for a DTensor. Its module (1.3 s to import) is loaded only once something shards: until then nothing
    can be one, and runs that do not shard never pay for the import."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def shard_model(model):
    """Shard model in place: each transformer block is a unit (its parameters gathered only while it runs), the
    embeddings, final LayerNorm and tied head form the root unit. Every process starts from rank 0's weights, as
    DDP makes them (each process initialised its own from seed + rank)."""
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def full_tensor(t):
    """The whole tensor (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def state_dicts(model, optimizer):
    """(model state, optimizer state) as a single process holds them: full tensors on the CPU, integer parameter
    ids in the optimizer state. A collective when the model is sharded; the tied embedding is gathered once (its two
    names come as two DTensors over one local shard)."""
    gathered = {}

    def full(t):
        if is_sharded(t):
            key = t.to_local().data_ptr()
            if key not in gathered:
                gathered[key] = t.full_tensor().cpu()
            return gathered[key]
        return t

    model_state = {k: full(v) for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    optim["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in optim["state"].items()}
    return model_state, optim


def load_optimizer_state(optimizer, state):
    """Load a full optimizer state (any run's checkpoint) into an optimizer over sharded parameters: each tensor
    that has its parameter's shape is cut into that parameter's shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard_like(value, p):
        if is_sharded(p) and torch.is_tensor(value) and value.shape == p.shape:
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    sharded = {i: {k: shard_like(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def local_numel(model):
    """Parameter elements this process holds (its shards, or everything when not sharded); parameters() yields the
    tied embedding once."""
    return sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())
