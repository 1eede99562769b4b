"""The DeepSpeed config, derived from TrainConfig (never hand-edited), plus an optional user JSON on top.

The optimizer is a client torch AdamW, not a DeepSpeed optimizer type: a DeepSpeed type would
JIT-compile FusedAdam/CPUAdam (minutes) and would not match a plain torch run bit-for-bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from common.merge import deep_merge

from .config import TrainConfig, TrainConfigError

# Keys the data pipeline derives from TrainConfig; an override may repeat them but not change them.
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_ds_config(cfg: TrainConfig, world_size: int, dtype: torch.dtype, on_cuda: bool) -> dict:
    zero: dict = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": on_cuda,  # gloo on CPU gains nothing from a side stream
        "reduce_scatter": True,
    }
    if cfg.zero_stage == 3:
        zero.update({
            "stage3_param_persistence_threshold": cfg.param_persistence_threshold,
            # export gathers parameter by parameter itself (engine/zero3.py), not through DeepSpeed
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    config = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum(world_size),
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,  # the trainer logs; DeepSpeed's own step prints would duplicate it
        "wall_clock_breakdown": False,
    }
    if cfg.ds_config_override:
        config = merge_override(config, Path(cfg.ds_config_override))
    return config


def merge_override(config: dict, path: Path) -> dict:
    """Deep-merge the user's DeepSpeed JSON over the derived config (the user wins, except batch keys)."""
    override = json.loads(path.read_text())
    for key in _BATCH_KEYS:
        if key in override and override[key] != config[key]:
            raise TrainConfigError(f"{path}: {key}={override[key]} contradicts the train config ({config[key]}); "
                                   "set global_batch / micro_batch in the train config instead")
    for key in ("optimizer", "scheduler"):
        if key in override:
            raise TrainConfigError(f"{path}: {key!r} is set by the trainer (client AdamW + cosine schedule); "
                                   "remove it from the override")
    return deep_merge(config, override)
