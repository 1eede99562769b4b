"""CUDA graphs of the decode-only step (one new token per sequence), one per batch-size bucket.

Decode steps are launch-bound (hundreds of small kernels per token), so the runner replays them. Only a
backend with supports_cuda_graphs (the Triton one: fixed shapes for a given batch size) is captured.
"""
from __future__ import annotations

import torch

from .sequence import Sequence

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """Captured lazily on first use. Inputs live in static buffers; rows beyond the real batch write their
    K/V into the spare block and have context length 0 (the decode kernel returns zeros for them).
    The graphs hold the model's parameter and the KV cache's addresses: in-place weight updates are seen,
    replaced parameter tensors are not (build a new Sampler for a new model object), and freeing the cache
    clears them."""

    def __init__(self, runner, max_num_seqs: int):
        self.runner = runner
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.max_batch = self.buckets[-1]
        c = runner.model.config
        self.max_blocks = -(-c.max_seq_len // runner.block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buffers = None

    def clear(self) -> None:
        self.graphs.clear()
        self.buffers = None

    def _alloc(self):
        dev, n = self.runner.device, self.max_batch
        trash = self.runner.num_blocks * self.runner.block_size  # first slot of the spare block
        self.buffers = dict(
            ids=torch.zeros(n, dtype=torch.long, device=dev),
            pos=torch.zeros(n, dtype=torch.long, device=dev),
            slot=torch.full((n,), trash, dtype=torch.long, device=dev),
            ctx=torch.zeros(n, dtype=torch.int32, device=dev),
            tables=torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev),
        )
        self.trash = trash

    def _forward(self, bs: int) -> torch.Tensor:
        b, r = self.buffers, self.runner
        r.backend.bind_decode(b["slot"][:bs], b["tables"][:bs], b["ctx"][:bs])
        hidden = r.model(b["ids"][None, :bs], positions=b["pos"][None, :bs], attn_backend=r.backend,
                         return_hidden=True)[0]
        return r.logits(hidden)

    def _capture(self, bs: int):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles kernels) outside the capture; rows are padding
            self._forward(bs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(bs)
        self.runner.backend.finish()
        return graph, out

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        if self.buffers is None:
            self._alloc()
        n = len(seqs)
        bs = next(b for b in self.buckets if b >= n)
        b, block_size = self.buffers, self.runner.block_size
        width = max(len(s.block_table) for s in seqs)
        ids, pos, slot, ctx, tables = [], [], [], [], []
        for seq in seqs:
            p = seq.num_computed
            ids.append(seq.token_ids[p])
            pos.append(p)
            slot.append(seq.block_table[p // block_size] * block_size + p % block_size)
            ctx.append(p + 1)
            tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
        pad = bs - n
        rows = torch.tensor([ids + [0] * pad, pos + [0] * pad, slot + [self.trash] * pad, ctx + [0] * pad])
        tables = torch.tensor(tables, dtype=torch.int32)
        rows = rows.to(self.runner.device, non_blocking=True)
        b["ids"][:bs].copy_(rows[0])
        b["pos"][:bs].copy_(rows[1])
        b["slot"][:bs].copy_(rows[2])
        b["ctx"][:bs].copy_(rows[3])
        b["tables"][:n, :width].copy_(tables.to(self.runner.device, non_blocking=True))
        if bs not in self.graphs:
            self.graphs[bs] = self._capture(bs)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:n].float()
