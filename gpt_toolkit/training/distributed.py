"""Several training processes under torchrun (DDP): which process this is, its device, the process group, and
decisions every rank must take together."""
import os

import torch
import torch.distributed as dist

from gpt_toolkit.core import system
from gpt_toolkit.core.errors import ConfigError
from gpt_toolkit.models.checkpoint import rng_state


def ranks(cfg):
    """(rank, local_rank, world_size) when launched by torchrun, else (0, 0, 1)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if cfg.gradient_accumulation_steps % world_size:
        near = max(world_size, round(cfg.gradient_accumulation_steps / world_size) * world_size)
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                          f"{world_size} DDP processes (each runs an equal share of the micro-steps): use "
                          f"--gradient_accumulation_steps={near}")
    return rank, local_rank, world_size


def check_fsdp(cfg, world_size):
    """Refuse, before any work, what FSDP cannot do here."""
    for key in ("grad_monitor_interval", "check_init"):
        if getattr(cfg, key):
            raise ConfigError(f"{key} looks at the whole model in one process, and parallel=fsdp shards it: "
                              f"use --parallel=ddp for that run, or drop --{key}")
    if cfg.device == "mps":
        raise ConfigError("parallel=fsdp needs CUDA (nccl) or CPU (gloo) processes; MPS has no process group: "
                          "use --device=cpu")
    if world_size == 1:
        raise ConfigError("parallel=fsdp shards the model across torchrun processes: launch it with torchrun "
                          "--nproc_per_node=N train.py ..., or train one process without --parallel=fsdp")


def process_device(device, local_rank, world_size):
    """The device this process trains on: with several processes on CUDA, GPU number local_rank."""
    if world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


def pick_backend(backend, device):
    """The process group's backend: nccl on CUDA, gloo elsewhere and on Windows (where PyTorch has no nccl), unless
    backend names one; nccl on Windows is refused."""
    windows = system.is_windows()
    if backend == "nccl" and windows:
        raise ConfigError("backend=nccl does not exist on Windows: use --backend=gloo (or auto, which picks it)")
    if backend != "auto":
        return backend
    return "nccl" if torch.device(device).type == "cuda" and not windows else "gloo"


def init_process_group(backend, device, world_size):
    """Join the torchrun job with pick_backend's backend. On Windows the store's client must not ask for libuv,
    which PyTorch's Windows builds lack since 2.4 (USE_LIBUV=0, unless set; torchrun itself needs it set by the
    user, docs/distributed.md)."""
    if world_size == 1:
        return
    kind = torch.device(device).type
    if system.is_windows():
        os.environ.setdefault("USE_LIBUV", "0")
    dist.init_process_group(backend=pick_backend(backend, device))
    if kind == "cuda":
        torch.cuda.set_device(device)


def destroy_process_group(world_size):
    """Leave the job. The barrier first lets gloo's worker thread finish with the last collective: destroying the
    group while it still holds that collective's Python tensors deadlocked a rank at exit (it waits for the GIL
    that the exiting main thread holds)."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def agree_with_master(flag, device, world_size):
    """Rank 0's decision, on every rank (a collective)."""
    if world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def stop_reasons(signum, log_failed, device, world_size):
    """(the stop signal if any process got one, whether any process's log write failed): all ranks stop after the
    same step (a collective)."""
    if world_size == 1:
        return signum, log_failed
    flags = torch.tensor([signum or 0, int(log_failed)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0].item()) or None, bool(flags[1].item())


def all_rng_states(device, world_size):
    """Every process's RNG state, in rank order (a collective: all ranks call it at the same step)."""
    mine = rng_state(device)
    if world_size == 1:
        return [mine]
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states
