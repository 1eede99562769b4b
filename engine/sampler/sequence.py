"""Per-sequence state: tokens so far, how many have K/V in the cache, its block table, its RNG.

One Sequence is one sample of one prompt. Prefill and decode are the same thing here: each step computes
the sequence's not-yet-cached tokens (all of them, or a chunk), and samples when none are left.
"""
from __future__ import annotations

import enum

import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, sample) pairs over the seed space


def sample_seed(seed: int, sample_index: int) -> int:
    return (seed * _SEED_MIX + sample_index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


class Sequence:
    __slots__ = (
        "seq_id", "prompt_index", "sample_index", "token_ids", "num_prompt_tokens", "params", "max_len",
        "num_computed", "block_table", "block_hashes", "status", "generator", "logprobs", "finish_reason",
        "stop_ids", "stopped_by_string",
    )

    def __init__(self, seq_id: int, prompt_index: int, sample_index: int, prompt_ids: list[int], params,
                 max_len: int, stop_ids: frozenset[int], seed: int):
        self.seq_id = seq_id
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.max_len = max_len  # prompt + generated never exceeds this (context window / max_new_tokens)
        self.num_computed = 0  # leading tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.status = SequenceStatus.WAITING
        # One generator per sample: its draws depend only on (seed, sample index, step), never on which
        # other sequences share the batch or on preemption (recompute draws nothing).
        self.generator = torch.Generator().manual_seed(sample_seed(seed, sample_index))
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.finish_reason: str | None = None
        self.stop_ids = stop_ids
        self.stopped_by_string = False  # the text is then cut at the stop string

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model (1 while decoding, the rest of the prompt in prefill)."""
        return len(self.token_ids) - self.num_computed
