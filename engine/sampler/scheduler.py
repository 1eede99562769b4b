"""Continuous batching: decide which sequences run this step and how many tokens each computes.

Running sequences go first (decode, or the next chunk of a long prompt), then waiting ones are admitted
while the step's token budget, the sequence cap and the free blocks allow. When a running sequence needs
a block and none is free, the youngest running sequences are preempted: their blocks are released (hashed
blocks stay cached, so with prefix caching the recompute is mostly a cache hit) and they go back to the
front of the queue. After each step, postprocess advances what the step computed, appends the sampled
tokens and finishes the sequences that stop (stop token, stop string, max_new_tokens or the context window,
both of which Sequence.max_len holds). No tensors here.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from .block_manager import BlockManager
from .sampling import find_stop, stop_window
from .sequence import Sequence, SequenceStatus


class Scheduler:
    """decode: token ids -> text, for SamplingParams.stop strings (None: no tokenizer, none may be asked)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batched_tokens: int,
                 decode: Callable[[list[int]], str] | None = None):
        if max_num_seqs <= 0 or max_batched_tokens <= 0:
            raise ValueError(
                f"Scheduler: max_num_seqs={max_num_seqs} and max_batched_tokens={max_batched_tokens} must be positive"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.decode = decode
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

    def postprocess(self, scheduled: list[tuple[Sequence, int]], sampling: list[Sequence], tokens: list[int],
                    logprobs: list[float] | None = None) -> list[Sequence]:
        """After a step ran scheduled: its tokens now have K/V; sampling[k] drew tokens[k] (with logprobs[k]
        when it asked for them). Returns the sequences this step finished, in sampling order."""
        for seq, n in scheduled:
            seq.num_computed += n
        finished = []
        for k, (seq, tok) in enumerate(zip(sampling, tokens)):
            seq.token_ids.append(tok)
            if seq.logprobs is not None:
                seq.logprobs.append(logprobs[k])
            reason = self.finish_reason(seq, tok)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish_reason(self, seq: Sequence, tok: int) -> str | None:
        """Why seq ends with tok: "stop" (a stop token, or a stop string in the newest text), "length"
        (max_len reached), or None (it goes on)."""
        if tok in seq.stop_ids:
            return "stop"
        stops = seq.params.stop
        if stops:
            window = seq.token_ids[max(seq.num_prompt_tokens, len(seq.token_ids) - stop_window(stops)):]
            if find_stop(self.decode(window), stops) >= 0:
                seq.stopped_by_string = True  # located exactly in the full text when the completion is built
                return "stop"
        if len(seq.token_ids) >= seq.max_len:
            return "length"
        return None

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
