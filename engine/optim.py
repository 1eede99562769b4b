"""The optimizer of every training loop here: AdamW over decayed matrices and undecayed gains.

The trainer's runners (engine/train_backends.py) and the world's M0 pretraining (loop/world/m0.py) both
build it here, with the lr set each step by engine/schedule.py, so there is one optimizer recipe to read.
"""
from __future__ import annotations

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not norm gains (1-D); one group when there is no decay.

    Shapes are read through `ds_shape` where ZeRO-3 has replaced a parameter by an empty partition."""
    params = [p for p in module.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    matrix = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    vector = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    return [{"params": matrix, "weight_decay": weight_decay}, {"params": vector, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    # foreach: one kernel per op over all tensors instead of a Python loop per parameter (the same
    # numbers, measured bit for bit on CPU)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)
