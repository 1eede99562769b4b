"""Trainer -> sampler hand-off in memory: the weights a stage just trained become the next phase's
sampler without re-reading the HF export from disk.

At the end of training every rank walks the parameters once, one gathered at a time (ZeRO-3
all-gathers each from the partitions); rank 0 copies it for the HF export (still written, for the
record and for resume) and every rank keeps what its own sampler needs: the whole tensor (TP=1) or its
tensor-parallel slice. So the transient cost per rank is one full parameter, never the model, and
the optimizer state and the DeepSpeed engine are gone before the sampler allocates its KV cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from model.config import LlamaConfig
from model.weight_loading import CheckpointReader

from .zero3 import each_full_parameter


@dataclass(frozen=True)
class HandoffRequest:
    """What the sampler of the next phase wants from the trained weights."""
    dtype: torch.dtype | None = None  # sampler dtype; None = the export's (training) dtype
    device: torch.device | None = None  # None: the training device
    # plan(model config) -> keep(name, full tensor) -> this rank's tensor (its tensor-parallel slice);
    # None keeps every tensor whole
    plan: Callable[[LlamaConfig], Callable[[str, torch.Tensor], torch.Tensor]] | None = None


@dataclass
class HandedOff:
    """This rank's sampler weights, taken out of training."""
    config: LlamaConfig  # the exported (full) model's config
    tensors: dict[str, torch.Tensor]  # whole, or this rank's tensor-parallel slices (sharded=True)
    seconds: float = 0.0
    # measured while walking: the most bytes of full (gathered) parameters alive at once beyond the
    # rank's own partitions and what it keeps; the hand-off's transient cost
    peak_gathered_bytes: int = 0
    kept_bytes: int = 0
    sharded: bool = False

    def reader(self) -> CheckpointReader:
        """The handed-off tensors as a checkpoint reader (each tensor given up as it is read, so building
        the sampler's model never holds two copies)."""
        tensors = self.tensors

        def fetch(name: str) -> torch.Tensor:
            return tensors.pop(name)

        return CheckpointReader(self.config, fetch, lambda name: ("<in-memory hand-off>", name))

    def summary(self) -> dict:
        return {"handoff_s": round(self.seconds, 4), "handoff_peak_gathered_bytes": self.peak_gathered_bytes,
                "handoff_kept_bytes": self.kept_bytes}


def _gathered_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters currently held whole on this rank although ZeRO-3 partitions them."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_id") and p.numel() == p.ds_numel and p.ds_numel > p.ds_tensor.numel():
            total += p.numel() * p.element_size()
    return total


def collect(model: torch.nn.Module, export_dtype: torch.dtype, config: LlamaConfig,
            request: HandoffRequest | None, export: dict | None) -> HandedOff | None:
    """One pass over the full parameters: export[name] (CPU, export_dtype) where export is a dict (rank
    0), and this rank's sampler tensors when request is given. Collective: every rank calls it (the
    ZeRO-3 gathers), whatever it keeps."""
    t0 = time.perf_counter()
    kept: dict[str, torch.Tensor] = {}
    peak = 0
    keep = request.plan(config) if request is not None and request.plan is not None else None

    def visit(name: str, full: torch.Tensor, gathered: bool) -> None:
        nonlocal peak
        peak = max(peak, _gathered_bytes(model))
        # A gathered buffer is re-partitioned after this call: copy. An unpartitioned parameter (one
        # process) is the model's own data, and the model is discarded after this walk: share it.
        if export is not None:
            export[name] = full.to("cpu", export_dtype, copy=gathered)
        if request is not None:
            # through the export dtype first, so the sampler sees exactly what a reload of the export gives
            t = full.to(export_dtype)
            if keep is not None:
                t = keep(name, t)  # a copy of this rank's slice
                gathered = False
            dtype = request.dtype or export_dtype
            kept[name] = t.to(device=request.device or full.device, dtype=dtype, copy=gathered)

    each_full_parameter(model, visit)
    if request is None:
        return None
    return HandedOff(config=config, tensors=kept, seconds=time.perf_counter() - t0, peak_gathered_bytes=peak,
                     kept_bytes=sum(t.numel() * t.element_size() for t in kept.values()), sharded=keep is not None)
