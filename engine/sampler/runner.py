"""Tensors in, logits out: turns a scheduled step into one varlen forward of the model.

Owns the attention backend (engine/sampler/attention/: torch on CPU, Triton on CUDA unless attention_impl
says otherwise), which owns the per-layer KV caches and each step's metadata, and sizes that cache
(engine/sampler/kv_sizing.py; for a fraction kv_memory on CUDA, from a warm-up step at the largest batch).
The model is the training Llama, called with B=1, T=all tokens of the step and per-token positions; logits
are computed only for the rows that sample (the last token of each sequence with nothing left to compute).
A tensor-parallel shard (engine/sampler/tensor_parallel.py) is such a Llama with this rank's head counts in
model.config, so the caches hold only its KV heads; its local logits are gathered along the vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import PagedAttentionBackend, select_backend
from .decode_graphs import DecodeGraphs
from .kv_sizing import is_fraction, kv_bytes_per_block, memory_probe, num_kv_blocks
from .sampling import SamplingParams, sample_next
from .sequence import Sequence

__all__ = ["ModelRunner", "kv_bytes_per_block"]

# The warm-up samples like a nucleus request: the sort and the fp64 CDF are the sampler's largest copies.
_WARMUP_PARAMS = SamplingParams(temperature=1.0, top_p=0.9, logprobs=True)


class ModelRunner:
    """kv_memory: bytes (> 1) or a fraction (0, 1] of what is left (see kv_sizing); memory: the probe the
    fraction is taken of (default: the device's)."""

    def __init__(self, model, kv_memory: float | int, block_size: int, max_num_seqs: int, max_batched_tokens: int,
                 attention_impl: str = "auto", cuda_graphs: bool = True, memory=None):
        self.model = model
        self.tp = getattr(model, "tp", None)  # TPState of a tensor-parallel shard, else None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.backend_cls = select_backend(attention_impl, self.device)
        self.backend: PagedAttentionBackend | None = None
        self.num_blocks = self._size_cache(kv_memory, max_num_seqs, max_batched_tokens, memory)
        # Decode steps are launch-bound (hundreds of small kernels per token): replay them as CUDA graphs.
        # Not under TP: capturing the per-layer NCCL all-reduces in CUDA graphs is not verified yet.
        self.graphs = DecodeGraphs(self, max_num_seqs) if cuda_graphs and self.backend_cls.supports_cuda_graphs \
            and self.device.type == "cuda" and self.tp is None else None

    # --- KV cache -----------------------------------------------------------------------------
    def _size_cache(self, kv_memory, max_num_seqs: int, max_batched_tokens: int, memory) -> int:
        c = self.model.config
        per_block = kv_bytes_per_block(c, self.block_size, self.dtype)
        useful = max_num_seqs * -(-c.max_seq_len // self.block_size) + 1
        if is_fraction(kv_memory):
            probe = memory if memory is not None else memory_probe(self.device)
            peak = self.profile(max_num_seqs, max_batched_tokens, probe) if probe.profiles else 0
            num_blocks = num_kv_blocks(kv_memory, per_block, useful, probe.free(), peak, probe.cap)
        else:
            num_blocks = num_kv_blocks(kv_memory, per_block, useful)
        if self.tp is not None:
            # Free memory differs per rank, but the ranks must schedule identically (same blocks).
            num_blocks = self.tp.agree_min(num_blocks, self.device)
        return num_blocks

    def warmup_batch(self, max_num_seqs: int, max_batched_tokens: int) -> tuple[int, int, int]:
        """(sequences, tokens each, context each after the step) of the largest step: the token budget over
        as many sequences as may run at once, all sampling, each at the end of the context window, so the
        attention's K/V gathers and the [S, V] logits are as wide as a real step can make them."""
        end = self.model.config.max_seq_len - 1  # the longest context a computed token can have
        num_seqs = max(1, min(max_num_seqs, max_batched_tokens))
        return num_seqs, max(1, min(max_batched_tokens // num_seqs, end)), end

    @torch.inference_mode()
    def profile(self, max_num_seqs: int, max_batched_tokens: int, probe) -> int:
        """Peak bytes of the warm-up step (forward, logits, sampling) above what was resident before it.
        Its sequences all read the same few blocks of a throwaway cache: contents do not matter here."""
        num_seqs, q, end = self.warmup_batch(max_num_seqs, max_batched_tokens)
        table = list(range(-(-end // self.block_size)))
        backend = self.backend_cls(self.model.config, len(table), self.block_size, self.dtype, self.device)
        seqs = []
        for i in range(num_seqs):
            seq = Sequence(-1 - i, i, 0, [0] * end, _WARMUP_PARAMS, end, frozenset(), 0)
            seq.block_table, seq.num_computed = table, end - q
            seqs.append(seq)
        decode, prefill = (seqs, []) if q == 1 else ([], [(seq, q) for seq in seqs])
        probe.start()
        self.backend = backend
        try:
            sampling, logits = self._eager(decode, prefill)
            n = len(sampling)
            sample_next(logits, torch.ones(n, device=logits.device), torch.full((n,), 0.9, device=logits.device),
                        torch.zeros(n, dtype=torch.long, device=logits.device), [s.generator for s in sampling], True)
            del logits
            return probe.peak()
        finally:
            self.backend = None

    def allocate_cache(self) -> None:
        if self.backend is None:
            self.backend = self.backend_cls(self.model.config, self.num_blocks, self.block_size, self.dtype,
                                            self.device)

    def free_cache(self) -> None:
        self.backend = None
        if self.graphs is not None:
            self.graphs.clear()

    # --- steps --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Compute the scheduled tokens; returns the sequences that sample now and their fp32 logits [S, V]."""
        self.allocate_cache()
        decode = [seq for seq, n in scheduled if n == 1]
        prefill = [(seq, n) for seq, n in scheduled if n > 1]
        if self.graphs is not None and not prefill and len(decode) <= self.graphs.max_batch and all(
                seq.num_computed + 1 == len(seq.token_ids) for seq in decode):
            return decode, self.graphs.run(decode)
        return self._eager(decode, prefill)

    def _eager(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]):
        input_ids, positions = [], []
        for seq in decode:
            input_ids.append(seq.token_ids[seq.num_computed])
            positions.append(seq.num_computed)
        for seq, n in prefill:
            input_ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            positions.extend(range(seq.num_computed, seq.num_computed + n))
        self.backend.prepare(decode, prefill)
        sampling, rows, row = [], [], 0
        for seq, n in [(seq, 1) for seq in decode] + prefill:
            row += n
            if seq.num_computed + n == len(seq.token_ids):
                sampling.append(seq)
                rows.append(row - 1)
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model(ids[None], positions=pos[None], attn_backend=self.backend, return_hidden=True)[0]
        self.backend.finish()
        if not sampling:
            return sampling, None
        rows_t = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        logits = self.logits(hidden[rows_t])
        if logits.dtype != torch.float64:
            logits = logits.float()
        return sampling, logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, H] final hidden states -> [S, V] logits in the model dtype (the full vocab on every TP rank)."""
        logits = F.linear(hidden, self.model.output_weight)
        return logits if self.tp is None else self.tp.gather_vocab(logits)
