"""A minimal Llama: RMSNorm, RoPE (with Llama 3 scaling), grouped-query attention, SwiGLU.

Module and parameter names mirror Hugging Face's LlamaForCausalLM (minus the leading "model."),
so checkpoint conversion is a rename, not a rewrite. The model holds no parallelism or sampling
policy: attention goes through a pluggable backend so the sampler can run these same modules over
a paged KV cache, and the forward can stop at the final hidden states for the fused log-prob kernel.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig

try:  # optional GPU extra
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - absent on CPU machines
    flash_attn_func = None


class AttentionBackend(Protocol):
    """Computes attention for one layer. q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (RoPE applied).

    Returns [B, T, Hq, D]. A backend may also read/write a KV cache keyed by layer_idx."""

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class CausalSelfAttention:
    """Default backend: causal attention over the tokens of this forward, optional key padding mask."""

    def __init__(self, attention_mask: torch.Tensor | None = None):
        self.attention_mask = attention_mask  # [B, T], 1 = real token
        self._mask = None

    def _bool_mask(self, T: int, device) -> torch.Tensor:
        if self._mask is None:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            keep = causal[None] & self.attention_mask.bool()[:, None, :]
            # A padding query with no visible key would softmax over nothing (NaN): let it see itself.
            keep = keep | torch.eye(T, dtype=torch.bool, device=device)[None]
            self._mask = keep[:, None]  # [B, 1, T, T]
        return self._mask

    def __call__(self, layer_idx, q, k, v):
        B, T, Hq, D = q.shape
        if self.attention_mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (
            torch.float16, torch.bfloat16,
        ):
            return flash_attn_func(q, k, v, causal=True)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = Hq // k.shape[1]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bool_mask(T, q.device))
        return out.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32 (as HF and Meta do), scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq.float()
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x: [B, T, H, D]; cos/sin: [B, T, D] (HF's half-split convention)."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, cos, sin, backend: AttentionBackend, layer_idx: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend(layer_idx, q, k, v)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.down_proj = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, backend, layer_idx):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, backend, layer_idx))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False

    @property
    def output_weight(self) -> nn.Parameter:
        """The [V, H] lm_head weight (the embedding when tied) — what the fused log-prob op consumes."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "Llama":
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)
        return self

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attn_backend: AttentionBackend | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or final-norm hidden states [B, T, H]).

        positions [B, T] default to 0..T-1; attention_mask [B, T] marks real tokens (1) vs padding (0)
        and is used only by the default backend; a custom backend owns its own masking."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        backend = attn_backend if attn_backend is not None else CausalSelfAttention(attention_mask)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, backend, i, use_reentrant=False)
            else:
                h = layer(h, cos, sin, backend, i)
        h = self.norm(h)
        if return_hidden:
            return h
        return F.linear(h, self.output_weight)
