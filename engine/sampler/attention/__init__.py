"""Paged attention backends for the sampler, one interface (base.PagedAttentionBackend): each owns its
cache layout, builds its own metadata for a step's batch and runs the forward over the paged K/V cache.

torch_sdpa: head-major caches, gathered K/V, SDPA / matmuls (the CPU path). triton_paged: block-major
caches, the Triton paged decode kernel (the CUDA path, and the only one CUDA graphs capture).
"""
from __future__ import annotations

import torch

from .base import PagedAttentionBackend
from .torch_sdpa import TorchPagedAttention
from .triton_paged import TritonPagedAttention

BACKENDS = {"torch": TorchPagedAttention, "triton": TritonPagedAttention}

__all__ = ["BACKENDS", "PagedAttentionBackend", "TorchPagedAttention", "TritonPagedAttention", "select_backend"]


def select_backend(attention_impl: str, device: torch.device) -> type[PagedAttentionBackend]:
    """attention_impl "auto" picks Triton on CUDA and torch elsewhere."""
    if attention_impl == "auto":
        attention_impl = "triton" if device.type == "cuda" else "torch"
    if attention_impl not in BACKENDS:
        raise ValueError(f"sampler: attention_impl={attention_impl!r} (expected 'auto', 'torch' or 'triton')")
    return BACKENDS[attention_impl]
