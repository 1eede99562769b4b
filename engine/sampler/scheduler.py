"""Continuous batching: decide which sequences run this step and how many tokens each computes.

Running sequences go first (decode, or the next chunk of a long prompt), then waiting ones are admitted
while the step's token budget, the sequence cap and the free blocks allow. When a running sequence needs
a block and none is free, the youngest running sequences are preempted: their blocks are released (hashed
blocks stay cached, so with prefix caching the recompute is mostly a cache hit) and they go back to the
front of the queue. No tensors here.
"""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batched_tokens: int):
        if max_num_seqs <= 0 or max_batched_tokens <= 0:
            raise ValueError(
                f"Scheduler: max_num_seqs={max_num_seqs} and max_batched_tokens={max_batched_tokens} must be positive"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.block_manager.blocks_for(seq.max_len) > self.block_manager.num_blocks:
            # Would never fit even alone: refuse up front instead of looping or truncating.
            raise ValueError(
                f"sampler: a sequence of up to {seq.max_len} tokens needs "
                f"{self.block_manager.blocks_for(seq.max_len)} KV blocks but only "
                f"{self.block_manager.num_blocks} fit in kv_memory; raise kv_memory or lower max_new_tokens"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns (sequence, tokens to compute this step) pairs; reserves their blocks."""
        bm = self.block_manager
        budget = self.max_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        queue = deque(self.running)
        kept: list[Sequence] = []
        preempted = False
        while queue:
            seq = queue.popleft()
            num_tokens = min(seq.num_pending, budget)
            if num_tokens == 0:  # out of budget this step: keeps its blocks, runs next step
                kept.append(seq)
                continue
            target = seq.num_computed + num_tokens
            while not bm.can_grow(seq, target) and queue:
                self._preempt(queue.pop())
                preempted = True
            if not bm.can_grow(seq, target):
                self._preempt(seq)
                preempted = True
                continue
            bm.grow(seq, target)
            bm.register_full_blocks(seq, target)
            scheduled.append((seq, num_tokens))
            kept.append(seq)
            budget -= num_tokens
        self.running = kept

        # Admitting while preempting would only thrash: the freed blocks go to the preempted first.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = bm.try_admit(seq, budget)
            if num_tokens == 0:
                break
            self.waiting.popleft()
            bm.register_full_blocks(seq, seq.num_computed + num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        return scheduled

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.release(seq)
        self.running.remove(seq)

    def abort_all(self) -> None:
        for seq in self.running:
            self.block_manager.release(seq)
            seq.status = SequenceStatus.FINISHED
        for seq in self.waiting:
            seq.status = SequenceStatus.FINISHED
        self.running, self.waiting = [], deque()
