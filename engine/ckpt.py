"""Stage outputs on disk: the resumable checkpoint's bookkeeping and the final HF export.

The runners (engine/train_backends.py) write model, optimizer, scheduler and RNG state; this module decides
what the trainer's own client state holds (step, loss history, a fingerprint of the data so a resume
never continues on different data) and writes the HF checkpoint atomically: out_dir exists only
when it is complete.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import torch

from common.atomic import replace_dir

from model.checkpoint import save_state_dict
from model.config import LlamaConfig
from model.hf_format import CONFIG_FILE, INDEX_FILE
from model.meta_format import PARAMS_FILE

from .config import TrainConfig


def ckpt_dir_for(out_dir: str | Path) -> Path:
    return Path(str(Path(out_dir)) + ".ckpt")


def data_fingerprint(kind: str, lengths: list[int], cfg: TrainConfig) -> str:
    """What must match for a checkpoint to continue this run: the data (by lengths), order and batching."""
    h = hashlib.sha256()
    h.update(f"{kind}|{cfg.seed}|{cfg.global_batch}|{cfg.micro_batch}|{cfg.epochs}|{cfg.max_steps}|"
             f"{cfg.length_grouped}|{cfg.max_seq_len}".encode())
    h.update(torch.tensor(lengths, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def check_resumable(client_state: dict, fingerprint: str, ckpt_dir: Path) -> None:
    if client_state.get("fingerprint") != fingerprint:
        raise RuntimeError(f"{ckpt_dir}: checkpoint was written for different data or batching "
                           "(delete it or pass resume=False)")


def _is_weights_or_config(path: Path) -> bool:
    return (path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")
            or path.name in (CONFIG_FILE, INDEX_FILE, PARAMS_FILE))


def _embedded_tokenizer(gguf_file: Path):
    """The tokenizer a .gguf init embeds (None without one), so the HF export is self-contained."""
    from model.gguf_format import open_gguf
    from model.tokenizer import load_tokenizer

    return load_tokenizer(gguf_file) if "tokenizer.ggml.tokens" in open_gguf(gguf_file).fields else None


def export_hf(state_dict: dict[str, torch.Tensor], config: LlamaConfig, init_dir: str | Path,
              out_dir: str | Path) -> Path:
    """Write the HF checkpoint plus every other file of init_dir (tokenizer, chat template, ...); an init
    that is one .gguf file contributes the tokenizer it embeds."""
    out_dir, init_dir = Path(out_dir), Path(init_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        tokenizer = _embedded_tokenizer(init_dir) if init_dir.is_file() and init_dir.suffix == ".gguf" else None
        model_dir = save_state_dict(state_dict, config, staging / "model", tokenizer_dir=tokenizer)
        for f in sorted(init_dir.iterdir()) if init_dir.is_dir() else []:
            if f.is_file() and not f.name.startswith(".") and not _is_weights_or_config(f):
                shutil.copyfile(f, model_dir / f.name)
        replace_dir(model_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
