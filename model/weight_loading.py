"""What every checkpoint format shares: the one-line CheckpointError, and filling a Llama that was
built on the meta device one tensor at a time, so a checkpoint never sits in memory twice."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from common.errors import ConfigError

from .config import LlamaConfig
from .llama import Llama, rope_inv_freq


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or written; one line naming the file (and tensor)."""

    def __init__(self, file: str | Path, problem: str, tensor: str | None = None):
        where = f"{file}: tensor {tensor!r}" if tensor else f"{file}"
        super().__init__(" ".join(f"{where}: {problem}".split()))
        self.file, self.tensor, self.problem = str(file), tensor, problem


def make_config(file: str | Path, **fields) -> LlamaConfig:
    """LlamaConfig(**fields), with its validation error re-raised as a CheckpointError naming `file`."""
    try:
        return LlamaConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(file, str(e)) from None


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved RoPE pairs (Meta, llama.cpp) to HF's halves.

    Within each head, output rows (x0, x1, x2, x3, ...) rotated as pairs (x0,x1), (x2,x3) become
    (x0, x2, ..., x1, x3, ...), which is what rotate_half pairs up."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class CheckpointReader:
    """A checkpoint opened but not loaded: its config, and each parameter on demand (our names and
    layout, shape-checked). load_pretrained materializes one; a ZeRO-3 trainer can instead copy
    reader.get(name) into each partitioned parameter it gathers."""

    def __init__(self, config: LlamaConfig, fetch: Callable[[str], torch.Tensor],
                 where: Callable[[str], tuple[str, str]]):
        # fetch(name) -> tensor or CheckpointError; where(name) -> (file, key stored in the checkpoint)
        self.config, self._fetch, self.where = config, fetch, where
        with torch.device("meta"):
            self._shapes = {n: tuple(p.shape) for n, p in Llama(config).named_parameters()}

    def names(self) -> list[str]:
        return list(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        tensor = self._fetch(name)
        if tuple(tensor.shape) != self._shapes[name]:
            file, key = self.where(name)
            raise CheckpointError(file, f"shape {list(tensor.shape)} but the config expects {list(self._shapes[name])}", key)
        return tensor


def materialize(reader: CheckpointReader, dtype: torch.dtype | None, device: torch.device | str | None) -> Llama:
    """Build the Llama without allocating (meta device), then assign its parameters one at a time.

    dtype None keeps the dtype the embedding is stored in (so the model is uniform); device None
    means CPU."""
    with torch.device("meta"):
        model = Llama(reader.config)
    device = torch.device(device or "cpu")
    for name, param in list(model.named_parameters()):
        tensor = reader.get(name)
        if dtype is None:
            dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        owner, attr = _owner(model, name)
        setattr(owner, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=param.requires_grad))
        del tensor
    # inv_freq is a non-persistent buffer: recompute it (fp32, like HF) instead of loading it.
    model.inv_freq = rope_inv_freq(reader.config).to(device)
    return model


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr
