"""Meta's original Llama checkpoints: params.json + consolidated.NN.pth, one file per model-parallel
rank. Shards are memory-mapped (weights_only=True), merged tensor by tensor, and q/k rows are moved
from Meta's interleaved RoPE layout to the half-split one our Llama (like HF) uses."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import RopeScaling
from .weight_loading import CheckpointError, CheckpointReader, interleaved_to_half, make_config

PARAMS_FILE = "params.json"

# Our name suffix -> (Meta name suffix, dim the model-parallel shards are concatenated on; None = replicated)
_LAYER_MAP = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def meta_name(name: str) -> tuple[str, int | None]:
    if name == "embed_tokens.weight":
        return "tok_embeddings.weight", -1  # -1: decided from the shapes (Llama 2 splits dim, Llama 3 vocab)
    if name == "norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return "output.weight", 0
    _, layer, rest = name.split(".", 2)
    suffix, dim = _LAYER_MAP[rest]
    return f"layers.{layer}.{suffix}", dim


def is_meta_dir(directory: Path) -> bool:
    return (directory / PARAMS_FILE).is_file() and any(directory.glob("consolidated.*.pth"))


def ffn_dim_of(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing: 2/3 of 4*dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_meta(directory: Path) -> CheckpointReader:
    params_file = directory / PARAMS_FILE
    try:
        params = json.loads(params_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(params_file, f"cannot read ({e})") from None
    files = sorted(directory.glob("consolidated.*.pth"))
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:
            raise CheckpointError(f, f"cannot read checkpoint shard ({type(e).__name__}: {e})") from None
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int):
            raise CheckpointError(params_file, f"missing or non-integer key {key!r}")

    def shard_tensors(key: str) -> list[torch.Tensor]:
        for f, shard in zip(files, shards):
            if key not in shard:
                raise CheckpointError(f, "missing tensor", key)
        return [shard[key] for shard in shards]

    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    embed_parts = shard_tensors("tok_embeddings.weight")
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # Llama 2's params.json says -1: the tokenizer decides
        vocab = embed_parts[0].shape[0] if embed_parts[0].shape[1] != dim else sum(p.shape[0] for p in embed_parts)
    theta = float(params.get("rope_theta", 10000.0))
    scaled = bool(params.get("use_scaled_rope", False))
    llama3 = vocab >= 128000
    config = make_config(
        params_file, vocab_size=vocab, dim=dim, n_layers=params["n_layers"], n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=ffn_dim_of(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=theta,
        rope_scaling=RopeScaling() if scaled else None,
        # Meta's params.json does not record these; the values are those of the released models.
        max_seq_len=131072 if scaled else (8192 if llama3 else 4096), tie_embeddings=False,
        bos_token_id=128000 if llama3 else 1, eos_token_id=128001 if llama3 else 2,
    )

    def fetch(name: str) -> torch.Tensor:
        key, cat_dim = meta_name(name)
        parts = shard_tensors(key)
        if cat_dim == -1:
            cat_dim = 1 if parts[0].shape[1] != config.dim else 0
        tensor = parts[0] if cat_dim is None or len(parts) == 1 else torch.cat(parts, dim=cat_dim)
        if name.endswith("q_proj.weight") and tensor.shape[0] == config.n_heads * config.head_dim:
            tensor = interleaved_to_half(tensor, config.n_heads)
        elif name.endswith("k_proj.weight") and tensor.shape[0] == config.n_kv_heads * config.head_dim:
            tensor = interleaved_to_half(tensor, config.n_kv_heads)
        return tensor

    def where(name: str) -> tuple[str, str]:
        return (str(files[0]) if len(files) == 1 else f"{directory}/consolidated.*.pth"), meta_name(name)[0]

    return CheckpointReader(config, fetch, where)
