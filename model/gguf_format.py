"""llama.cpp GGUF files (architecture "llama") through the `gguf` package: metadata -> LlamaConfig,
tensors dequantized to float one at a time from the memory-mapped file, and the Q/K row permutation
that llama.cpp's converter applies undone."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from .config import RopeScaling
from .weight_loading import CheckpointError, CheckpointReader, interleaved_to_half, make_config

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_MAP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_LAYER_MAP[rest]}"


def open_gguf(file: Path):
    """A GGUFReader over the memory-mapped file; corrupt or truncated files -> CheckpointError.

    Parsing the metadata of a large vocabulary takes seconds, and the weights and the tokenizer
    read the same file, so the last two readers are kept (keyed by size and mtime)."""
    try:
        stat = Path(file).stat()
    except OSError as e:
        raise CheckpointError(file, f"cannot open ({e.strerror})") from None
    return _cached_reader(str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns, str(file))


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int, shown_name: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:
        raise CheckpointError(shown_name, f"cannot read GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor -> a float32 torch tensor in PyTorch [out, in] layout."""
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _rope_scaling(reader, file: Path, head_dim: int, theta: float, tensors: dict) -> RopeScaling | None:
    """llama.cpp stores Llama 3.1 rope scaling as per-frequency factors (rope_freqs.weight). Accept
    them when they are the standard Llama 3.1 parameters for some original context length."""
    kind = metadata(reader, "llama.rope.scaling.type", "none")
    if kind not in ("none", None):
        raise CheckpointError(file, f"unsupported llama.rope.scaling.type={kind!r}")
    if "rope_freqs.weight" not in tensors:
        return None
    factors = dequantize(tensors["rope_freqs.weight"]).double()
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    for original in (8192, 4096, 16384, 32768):
        s = RopeScaling(original_max_position_embeddings=original)
        expected = _llama3_factors(inv_freq, s)
        if factors.shape == expected.shape and torch.allclose(factors, expected, rtol=1e-3):
            return s
    raise CheckpointError(file, "rope_freqs.weight does not match Llama 3.1 rope scaling", "rope_freqs.weight")


def _llama3_factors(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    wavelen = 2 * math.pi / inv_freq
    low, high = s.original_max_position_embeddings / s.low_freq_factor, s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    factors = torch.where(wavelen > low, torch.full_like(inv_freq, s.factor), torch.ones_like(inv_freq))
    medium = (wavelen >= high) & (wavelen <= low)
    return torch.where(medium, 1 / ((1 - smooth) / s.factor + smooth), factors)


def read_gguf(file: Path) -> CheckpointReader:
    reader = open_gguf(file)
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(file, f"unsupported general.architecture={arch!r} (expected 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    for key in ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                "llama.feed_forward_length"):
        if metadata(reader, key) is None:
            raise CheckpointError(file, f"missing metadata key {key!r}")
    dim, n_heads = metadata(reader, "llama.embedding_length"), metadata(reader, "llama.attention.head_count")
    n_kv_heads = metadata(reader, "llama.attention.head_count_kv") or n_heads
    head_dim = metadata(reader, "llama.attention.key_length") or (dim // n_heads if n_heads else 0)
    vocab = metadata(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(metadata(reader, "tokenizer.ggml.tokens", [])) or (
            int(tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in tensors else 0)
    theta = float(metadata(reader, "llama.rope.freq_base", 10000.0))
    config = make_config(
        file, vocab_size=vocab, dim=dim, n_layers=metadata(reader, "llama.block_count"), n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn_dim=metadata(reader, "llama.feed_forward_length"), head_dim=head_dim,
        norm_eps=float(metadata(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
        rope_scaling=_rope_scaling(reader, file, head_dim, theta, tensors),
        max_seq_len=metadata(reader, "llama.context_length", 4096),
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id"),
    )

    def fetch(name: str) -> torch.Tensor:
        key = gguf_name(name)
        if key not in tensors:
            raise CheckpointError(file, "missing tensor", key)
        try:
            weight = dequantize(tensors[key])
        except NotImplementedError as e:
            raise CheckpointError(file, f"unsupported tensor type ({e})", key) from None
        except ValueError as e:  # a reshape that fails: data shorter than the header claims
            raise CheckpointError(file, f"cannot read tensor ({e})", key) from None
        # llama.cpp's converter interleaves q/k rows for its RoPE; a wrong shape is reported by the reader.
        if name.endswith("q_proj.weight") and weight.shape[0] == n_heads * head_dim:
            weight = interleaved_to_half(weight, n_heads)
        elif name.endswith("k_proj.weight") and weight.shape[0] == n_kv_heads * head_dim:
            weight = interleaved_to_half(weight, n_kv_heads)
        return weight

    return CheckpointReader(config, fetch, lambda name: (str(file), gguf_name(name)))
