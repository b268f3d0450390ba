"""A model on its device with what trains it (build_training): its optimizer, the autocast context and the GradScaler
of its precision. train.py, and the tools through it, train what this builds."""
import contextlib
from dataclasses import dataclass

import torch

from gpt_toolkit.core import hardware
from gpt_toolkit.models import sharding
from gpt_toolkit.training.optimizers import muon_with_adamw
from model import FUSED_ADAMW_DEVICES


@dataclass
class Training:
    """What a training step needs: the model (on its device), its optimizer, the autocast context, the GradScaler."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ctx: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler


def build_training(model, cfg, *, device, dtype, fused=None, learning_rate=None, shard=False):
    """Move model to device and build what trains it: AdamW (weight decay on 2-D weights only; fused where the device
    has the kernel unless fused=False or cfg.fused_adamw is off), or with cfg.optimizer=muon Muon for the blocks'
    matrices and that AdamW for the rest; autocast for dtype, a GradScaler for float16, and activation checkpointing
    as cfg says. shard=True shards the model with FSDP first (under torchrun), so the optimizer's state is sharded
    too. Process-wide settings (TF32, the CPU allocator) are the script's to make: process.setup_process."""
    kind = hardware.device_type(device)
    model.config.activation_checkpointing = cfg.activation_checkpointing
    model.to(device)
    if shard:
        sharding.shard_model(model)
    # fused where the device has the kernel, for AdamW alone and beside Muon alike (torch's own None: never on a CPU)
    fused = bool(cfg.fused_adamw if fused is None else fused) and kind in FUSED_ADAMW_DEVICES
    lr = learning_rate or cfg.learning_rate
    if cfg.optimizer == "muon":
        optimizer = muon_with_adamw(model, weight_decay=cfg.weight_decay, learning_rate=lr, betas=(cfg.beta1, cfg.beta2),
                                    fused=fused, ns_dtype=hardware.optimizer_math_dtype(device))
    else:
        optimizer = model.configure_optimizers(weight_decay=cfg.weight_decay, learning_rate=lr,
                                               betas=(cfg.beta1, cfg.beta2), device_type=kind, fused=fused)
    return Training(model, optimizer, hardware.autocast(device, dtype), hardware.grad_scaler(device, dtype))
