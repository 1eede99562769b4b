"""LlamaConfig: the typed, validated description of one Llama-family model, plus named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency-dependent RoPE scaling (HF rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn_dim: int = 11008
    head_dim: int = 0  # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    dropout: float = 0.0  # residual dropout after attention and MLP (the paper trains with 0.1)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.head_dim == 0:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise ConfigError(f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        self.validate()

    def validate(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model config: {key}={getattr(self, key)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("model config: norm_eps and rope_theta must be positive")

    def replace(self, **changes) -> "LlamaConfig":
        if "dim" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", 0)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {sorted(unknown)}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    # --- sizes, for MFU and memory planning -------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        n = self.n_layers * per_layer + self.dim
        if include_embeddings:
            n += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B convention."""
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.dim  # lm_head matmul counts
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


_L3 = dict(vocab_size=128256, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)

PRESETS: dict[str, LlamaConfig] = {
    # a few million parameters: tests and the CPU default world
    "tiny": LlamaConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                        max_seq_len=1024, tie_embeddings=True),
    "smollm2-135m": LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                                bos_token_id=1, eos_token_id=2),
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama3-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=8192, **_L3),
    "llama3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, max_seq_len=8192, **_L3),
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=131072,
                               rope_scaling=RopeScaling(), **_L3),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ConfigError(f"model config: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
