"""Paged-KV batched sampler: generation and judging in-process on the training weights.

Split by job: block_manager (KV blocks, prefix cache), sequence (per-sample state), scheduler
(continuous batching, preemption), runner (varlen forward through the model's attention hook),
paged_attention (the backend), sampling (next-token choice, stops), sampler (public API),
distributed (data-parallel generate).
"""
from __future__ import annotations

from pathlib import Path

from .distributed import generate_distributed
from .sampler import Completion, Sampler
from .sampling import SamplingParams

__all__ = ["Sampler", "SamplingParams", "Completion", "generate_distributed", "load_sampler"]


def load_sampler(checkpoint_dir, *, tokenizer, dtype=None, device=None, **kw) -> Sampler:
    """Load a checkpoint (HF dir, Meta dir or .gguf) and wrap it in a Sampler.

    tokenizer: a Tokenizer object, a path for model.tokenizer.load_tokenizer, or None (token-id prompts only).
    Extra keyword arguments go to Sampler."""
    from model.checkpoint import load_pretrained

    if isinstance(tokenizer, (str, Path)):
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    model = load_pretrained(checkpoint_dir, dtype=dtype, device=device)
    model.eval()
    return Sampler(model, tokenizer=tokenizer, **kw)
