"""ZeRO-3 parameter handling: build a model already partitioned, fill it from an HF checkpoint, hand
the lm_head to the fused op, gather weights for export and for the sampler.

Loading is memory-honest: the model is constructed under deepspeed.zero.Init (each module's params
are partitioned as soon as the module exists), then each parameter in turn is gathered, rank 0 copies
the one tensor it reads lazily from the checkpoint into it, and leaving the context broadcasts
and re-partitions it. No rank ever holds more than its shard plus one full tensor.

Every function here is also correct on a model that is not partitioned (plain torch backend): it
then does nothing special.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from model.llama import Llama, rope_inv_freq
from model.weight_loading import CheckpointReader


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _gathered(params, modifier_rank=None, fwd_module=None):
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank, fwd_module=fwd_module)


def open_init(init_dir: str | Path, dropout: float | None = None) -> CheckpointReader:
    """The init checkpoint (HF, Meta or GGUF) opened lazily; dropout overrides the stored config's."""
    from model.checkpoint import open_checkpoint  # lazy: the GPU bench path needs no checkpoint libraries

    reader = open_checkpoint(init_dir)
    if dropout is not None:
        reader.config = reader.config.replace(dropout=dropout)
    return reader


def build_partitioned(reader: CheckpointReader, ds_config: dict, device: torch.device, rank: int) -> Llama:
    """Llama(reader.config) constructed under zero.Init and filled parameter by parameter."""
    import deepspeed

    # dtype comes from ds_config's bf16 flag: DeepSpeed 0.19 ignores an explicit dtype= on accelerators
    # without fp16 (CPU) and silently picks bf16.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Llama(reader.config)
    for name, param in model.named_parameters():
        with _gathered([param], modifier_rank=0):
            if rank == 0:
                tensor = reader.get(name)  # shape-checked against the config
                with torch.no_grad():
                    param.copy_(tensor)
                del tensor
    model.inv_freq = rope_inv_freq(reader.config).to(device)  # fp32 even when zero.Init cast buffers
    return model


def register_output_weight(loss_module: nn.Module, model: Llama) -> None:
    """Make ZeRO-3 gather lm_head (or the tied embedding) for `loss_module`'s forward AND backward.

    The fused log-prob op reads model.output_weight outside the module that owns it. Unregistered,
    ZeRO-3 hands it the empty partition placeholder (a shape error), and a GatheredParameters block
    around the forward alone would release it before backward needs it (the TRL failure). As an
    external parameter of the loss module, DeepSpeed gathers it in that module's pre-forward and
    pre-backward hooks and reduce-scatters its gradient like any other."""
    weight = model.output_weight
    if is_partitioned(weight):
        import deepspeed

        deepspeed.zero.register_external_parameter(loss_module, weight)


def local_numel(model: nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the full model): the partition check."""
    local = full = 0
    for p in model.parameters():
        if is_partitioned(p):
            local += p.ds_tensor.numel()
            full += p.ds_numel
        else:
            local += p.numel()
            full += p.numel()
    return local, full


def each_full_parameter(model: nn.Module, visit) -> None:
    """visit(name, full tensor, gathered) on every rank for every parameter, one parameter gathered at a
    time: the transient cost on each rank is one full tensor, never the model. A gathered tensor is only
    valid inside the call (its memory is re-partitioned right after): copy what you keep. An unpartitioned
    one is the model's own parameter data."""
    for name, param in model.named_parameters():
        with _gathered([param]):
            visit(name, param.detach(), is_partitioned(param))


@contextlib.contextmanager
def full_weights(model: Llama):
    """Sampler hand-off: every rank holds the full weights inside the block; released on exit.

    Gather once per generation phase, not per sampled token. A model whose full weights do not fit
    one device cannot be sampled this way: we fail up front with the sizes. The loop does not use
    this: it takes the weights out of training with each_full_parameter (engine/handoff.py), keeping
    per rank only what its sampler needs (its tensor-parallel slice)."""
    params = list(model.parameters())
    if not any(is_partitioned(p) for p in params):
        yield model
        return
    need = sum(p.ds_numel * p.element_size() for p in params)
    device = params[0].ds_tensor.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held = sum(p.ds_tensor.numel() * p.element_size() for p in params)
        if need - held > free:
            raise MemoryError(f"sampler hand-off: the full model needs {need / 2**30:.1f} GiB on one device "
                              f"but {free / 2**30:.1f} GiB is free; set model.tensor_parallel "
                              "to sample from per-rank slices (engine/handoff.py)")
    with _gathered(params):
        yield model
