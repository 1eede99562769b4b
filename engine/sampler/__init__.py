"""Paged-KV batched sampler: generation and judging in-process on the training weights.

Split by job: block_manager (KV blocks, prefix cache), sequence (per-sample state), scheduler
(continuous batching, preemption, appending sampled tokens and finishing), runner (varlen forward through
the model's attention hook, KV cache sizing), kv_sizing (the sizing arithmetic and memory probes),
attention/ (the torch and Triton paged attention backends), decode_graphs (CUDA graphs of decode steps),
sampling (next-token choice, stop strings), sampler (public API), distributed (data-parallel generate),
tensor_parallel (TP groups and this rank's model shard).
"""
from __future__ import annotations

from pathlib import Path

from .distributed import generate_distributed
from .sampler import Completion, Sampler
from .sampling import SamplingParams

__all__ = ["Sampler", "SamplingParams", "Completion", "generate_distributed", "load_sampler"]


def load_sampler(checkpoint_dir, *, tokenizer, dtype=None, device=None, tp_group=None, **kw) -> Sampler:
    """Load a checkpoint (HF dir, Meta dir or .gguf) and wrap it in a Sampler.

    tokenizer: a Tokenizer object, a path for model.tokenizer.load_tokenizer, or None (token-id prompts only).
    tp_group: None (the whole model), or this rank's TPGroups from tensor_parallel.build_groups (or its TP
    ProcessGroup): then only this rank's shard is kept, read tensor by tensor. Extra keyword arguments go
    to Sampler."""
    from model.checkpoint import checkpoint_format, load_pretrained, open_checkpoint

    if isinstance(tokenizer, (str, Path)):
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    groups = None
    if tp_group is not None:
        from .tensor_parallel import as_groups

        groups = as_groups(tp_group)
    if groups is None or groups.tp_size == 1:
        model = load_pretrained(checkpoint_dir, dtype=dtype, device=device)
    else:
        from .tensor_parallel import build_tp_model

        reader = open_checkpoint(checkpoint_dir)
        model = build_tp_model(reader.config, groups, reader.get, dtype=dtype, device=device)
        model.source_path, model.source_format = str(checkpoint_dir), checkpoint_format(checkpoint_dir)
    model.eval()
    return Sampler(model, tokenizer=tokenizer, **kw)
