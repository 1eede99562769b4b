"""The public Sampler: requests in, completions out, prompt-major.

Glues the parts: SamplingParams -> Sequences (one per sample) -> Scheduler (who runs) -> ModelRunner
(logits) -> sample_next (tokens) -> Scheduler.postprocess (append, stop checks, finish) -> Completions.
The runner sizes the KV cache when the Sampler is built (engine/sampler/kv_sizing.py), allocates it on the
first generate and keeps it until release(). Under ZeRO-3, gather once per generation phase and sample on
the gathered weights, e.g. `with GatheredParameters(params): s = Sampler(module); s.generate(...); s.release()`.
Cached prefixes and CUDA graphs are dropped automatically when the weights change between calls.

A tensor-parallel shard (engine/sampler/tensor_parallel.py) works the same on every rank of its group: the
KV cache is sized by the shard's own heads, the block count is the group's minimum, and the group's first
rank's sampled tokens are broadcast each step, so the ranks' schedules can never drift apart.

Every sequence also stops at the model's eos_token_id and the tokenizer's stop_ids, on top of
SamplingParams.stop_token_ids. A sequence that reaches the context window ends with "length".
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .runner import ModelRunner
from .sampling import SamplingParams, find_stop, sample_next
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]  # generated tokens, including a final stop token id when one ended it
    text: str  # decoded generated text, without the stop token / stop string ("" without a tokenizer)
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None  # one per token_ids entry when SamplingParams.logprobs


class Sampler:
    def __init__(self, model, *, tokenizer=None, kv_memory: float | int = 0.3, block_size: int = 16,
                 max_num_seqs: int = 256, max_batched_tokens: int = 4096, enable_prefix_caching: bool = True,
                 attention_impl: str = "auto", cuda_graphs: bool = True):
        self.model = model
        self.tp = getattr(model, "tp", None)  # TPState of a tensor-parallel shard, else None
        # The full model's config (vocab, context, eos); model.config of a shard has its local head counts.
        self.config = model.config if self.tp is None else self.tp.config
        self.tokenizer = tokenizer
        # The runner sizes the KV cache (under TP: the group's minimum) and picks the attention backend.
        self.runner = ModelRunner(model, kv_memory, block_size, max_num_seqs, max_batched_tokens, attention_impl,
                                  cuda_graphs)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_batched_tokens,
                                   decode=tokenizer.decode if tokenizer is not None else None)
        self._stats: dict = {}
        self._next_seq_id = 0
        self._weights_key = self._current_weights_key()

    def _current_weights_key(self) -> tuple:
        # In-place updates bump _version; re-gathered (ZeRO-3) or reassigned weights move data_ptr.
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def reset_prefix_cache(self) -> None:
        """Drop cached prefixes and CUDA graphs; generate does this itself when it sees the weights change
        (call it after changing weights in a way that neither bumps versions nor moves storage)."""
        self.block_manager.reset_prefix_cache()
        if self.runner.graphs is not None:
            self.runner.graphs.clear()
        self._weights_key = self._current_weights_key()

    def release(self) -> None:
        """Free the KV cache (the next generate allocates it again)."""
        self.runner.free_cache()
        self.block_manager = BlockManager(self.block_manager.num_blocks, self.block_manager.block_size,
                                          self.block_manager.enable_prefix_caching)
        self.scheduler.block_manager = self.block_manager

    @property
    def stats(self) -> dict:
        """Counters of the most recent generate call. prefix_hit_rate = prompt tokens served from the
        prefix cache / prompt tokens at admission (a preempted sequence is counted again on readmission)."""
        return dict(self._stats)

    # --- request intake -----------------------------------------------------------------------
    def _encode(self, prompts) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"sampler: prompt {i} is a string but the Sampler has no tokenizer")
                p = self.tokenizer.encode(p)
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"sampler: prompt {i} is empty (needs at least one token, e.g. BOS)")
            if len(ids) >= self.config.max_seq_len:
                raise ValueError(f"sampler: prompt {i} has {len(ids)} tokens; the context window is "
                                 f"max_seq_len={self.config.max_seq_len} (prompt must be shorter)")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"sampler: prompt {i} has token id {bad[0]} outside vocab_size={self.config.vocab_size}")
            out.append(ids)
        return out

    def _base_stop_ids(self) -> set[int]:
        ids = set()
        if self.config.eos_token_id is not None:
            ids.add(self.config.eos_token_id)
        if self.tokenizer is not None:
            ids.update(getattr(self.tokenizer, "stop_ids", ()) or ())
        return ids

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[Completion]:
        prompts = self._encode(prompts)
        changed = self._current_weights_key() != self._weights_key
        if self.tp is not None:  # the prefix cache steers scheduling: drop it on every rank or none
            changed = self.tp.agree_min(int(not changed), self.runner.device) == 0
        if changed:
            self.reset_prefix_cache()  # cached K/V and captured graphs belong to the old weights
        if params is None:
            params = SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"sampler: {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        base_stop = self._base_stop_ids()
        results: dict[tuple[int, int], Completion] = {}
        seqs = []
        for i, (ids, p) in enumerate(zip(prompts, per_prompt)):
            if p.stop and self.tokenizer is None:
                raise ValueError(f"sampler: prompt {i} has stop strings but the Sampler has no tokenizer")
            seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**62)
            for j in range(p.n):
                if p.max_new_tokens == 0:
                    results[i, j] = Completion(i, j, [], "", "length", [] if p.logprobs else None)
                    continue
                max_len = min(len(ids) + p.max_new_tokens, self.config.max_seq_len)
                seqs.append(Sequence(self._next_seq_id, i, j, ids, p, max_len,
                                     frozenset(base_stop | set(p.stop_token_ids)), seed))
                self._next_seq_id += 1
        try:
            for seq in seqs:
                self.scheduler.add(seq)
            self._run(seqs, results, progress)
        except BaseException:
            self.scheduler.abort_all()  # leave no blocks held by a failed or interrupted call
            raise
        return [results[i, j] for i, p in enumerate(per_prompt) for j in range(p.n)]

    def _run(self, seqs: list[Sequence], results: dict, progress: bool) -> None:
        bm, sched = self.block_manager, self.scheduler
        bm.lookup_tokens = bm.hit_tokens = 0
        preemptions_before = sched.num_preemptions
        steps = generated = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="seq")
        was_training = self.model.training
        self.model.eval()  # dropout off while sampling
        try:
            while sched.has_work():
                scheduled = sched.schedule()
                sampling, logits = self.runner.run(scheduled)
                steps += 1
                tokens, logprobs = [], None
                if sampling:
                    tokens, logprobs = self._sample(sampling, logits)
                    if self.tp is not None:
                        # Same logits and seeds would give the same tokens, but unseeded requests draw a seed
                        # per rank and all-reduce results are not promised bitwise equal everywhere: one
                        # diverging token would desynchronize the schedules and hang the collectives. One
                        # small broadcast.
                        tokens, logprobs = self.tp.broadcast_tokens(tokens, logprobs, logits.device)
                    generated += len(tokens)
                for seq in sched.postprocess(scheduled, sampling, tokens, logprobs):
                    results[seq.prompt_index, seq.sample_index] = self._completion(seq)
                    if bar is not None:
                        bar.update(1)
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        self._stats = {
            "prefix_hit_rate": bm.hit_rate,
            "preemptions": sched.num_preemptions - preemptions_before,
            "tokens_generated": generated,
            "steps": steps,
            "num_blocks": bm.num_blocks,
            "prompt_tokens": bm.lookup_tokens,
            "cached_prompt_tokens": bm.hit_tokens,
        }

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor):
        device = logits.device
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=device)
        top_ps = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=device)
        top_ks = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=device)
        gens = [None if s.params.temperature == 0 else s.generator for s in seqs]
        want_logprobs = any(s.logprobs is not None for s in seqs)
        return sample_next(logits, temps, top_ps, top_ks, gens, want_logprobs)

    def _completion(self, seq: Sequence) -> Completion:
        gen = seq.generated_ids
        text = ""
        if self.tokenizer is not None:
            shown = gen[:-1] if gen and gen[-1] in seq.stop_ids and seq.finish_reason == "stop" else gen
            text = self.tokenizer.decode(shown)
            if seq.stopped_by_string:
                cut = find_stop(text, seq.params.stop)
                if cut >= 0:
                    text = text[:cut]
        logprobs = list(seq.logprobs) if seq.logprobs is not None else None
        return Completion(seq.prompt_index, seq.sample_index, list(gen), text, seq.finish_reason, logprobs)
