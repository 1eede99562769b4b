"""Data-parallel generation: each rank samples a strided share of the prompts, results come back in order.

With a tensor-parallel sampler the share goes to each TP group instead (all its ranks run the same prompts
together). Works without torch.distributed initialized (or with one rank): then it is just sampler.generate.
"""
from __future__ import annotations

import torch.distributed as dist

from .sampler import Completion, Sampler
from .sampling import SamplingParams


def generate_distributed(sampler: Sampler, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                         *, progress: bool = False) -> list[Completion]:
    """Every rank calls this with the same prompts and params; every rank gets all completions, prompt-major."""
    if getattr(sampler, "tp", None) is not None:
        return _generate_tensor_parallel(sampler, prompts, params, progress)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sampler.generate(prompts, params, progress=progress)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"generate_distributed: {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    mine = list(range(rank, len(prompts), world))  # strided: long and short prompts spread over ranks
    local = sampler.generate([prompts[i] for i in mine], [per_prompt[i] for i in mine],
                             progress=progress) if mine else []
    for c in local:
        c.prompt_index = mine[c.prompt_index]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    by_key = {(c.prompt_index, c.sample_index): c for part in gathered for c in part}
    return [by_key[i, j] for i, p in enumerate(per_prompt) for j in range(p.n)]


def _generate_tensor_parallel(sampler: Sampler, prompts: list, params, progress: bool) -> list[Completion]:
    g = sampler.tp.groups
    if g.dp_size == 1:  # one TP group holds the world: every rank already gets every completion
        return sampler.generate(prompts, params, progress=progress and g.tp_rank == 0)
    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"generate_distributed: {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    mine = list(range(g.dp_rank, len(prompts), g.dp_size))  # strided over TP groups, not ranks
    local = sampler.generate([prompts[i] for i in mine], [per_prompt[i] for i in mine],
                             progress=progress and g.tp_rank == 0) if mine else []
    for c in local:
        c.prompt_index = mine[c.prompt_index]
    # The ranks of a TP group hold the same completions: only the group's first rank contributes them.
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local if g.tp_rank == 0 else [])
    by_key = {(c.prompt_index, c.sample_index): c for part in gathered for c in part}
    return [by_key[i, j] for i, p in enumerate(per_prompt) for j in range(p.n)]
