"""Data-parallel generation: each rank samples a strided share of the prompts, results come back in order.

Works without torch.distributed initialized (or with one rank): then it is just sampler.generate.
"""
from __future__ import annotations

import torch.distributed as dist

from .sampler import Completion, Sampler
from .sampling import SamplingParams


def generate_distributed(sampler: Sampler, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                         *, progress: bool = False) -> list[Completion]:
    """Every rank calls this with the same prompts and params; every rank gets all completions, prompt-major."""
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
