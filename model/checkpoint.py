"""Checkpoints in and out: the public entry points. Formats live beside this file (hf_format,
meta_format, gguf_format); this module only picks one."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import LlamaConfig
from .gguf_format import read_gguf
from .hf_format import CONFIG_FILE, read_hf, save_state_dict
from .llama import Llama
from .meta_format import is_meta_dir, read_meta
from .weight_loading import CheckpointError, CheckpointReader, materialize

__all__ = ["CheckpointError", "CheckpointReader", "load_pretrained", "open_checkpoint", "save_pretrained",
           "save_state_dict", "checkpoint_format"]


def checkpoint_format(path: str | Path) -> str:
    """'hf' | 'meta' | 'gguf' for what lives at path (CheckpointError when it is none of them)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return "hf"
    if path.is_dir() and is_meta_dir(path):
        return "meta"
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    raise CheckpointError(path, f"not a checkpoint (expected a directory with {CONFIG_FILE} or params.json + "
                          "consolidated.*.pth, or a .gguf file)")


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """The config of the checkpoint at path, with its tensors readable one at a time (nothing loaded)."""
    path = Path(path)
    return {"hf": read_hf, "meta": read_meta, "gguf": read_gguf}[checkpoint_format(path)](path)


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Llama:
    """Load a Llama from an HF directory, a Meta directory or a .gguf file, one tensor at a time
    (memory-mapped files, a model built on the meta device: never two copies of the weights).

    dtype None keeps the stored dtype (float32 for GGUF, which is dequantized). The returned model
    remembers where it came from (`source_path`, `source_format`): the tokenizer lives there too."""
    path = Path(path)
    model = materialize(open_checkpoint(path), dtype, device)
    model.source_path, model.source_format = str(path), checkpoint_format(path)
    return model


def save_pretrained(model: Llama, directory: str | Path, max_shard_size: int | str = "2GB",
                    tokenizer_dir=None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an HF Llama checkpoint (config.json + safetensors, sharded above max_shard_size)
    that transformers.LlamaForCausalLM.from_pretrained loads unchanged; atomic. tokenizer_dir: a
    directory with tokenizer files, or a Tokenizer, copied in so the checkpoint is self-contained."""
    config: LlamaConfig = model.config
    return save_state_dict(model.state_dict(), config, directory, max_shard_size=max_shard_size,
                           tokenizer_dir=tokenizer_dir, dtype=dtype)
