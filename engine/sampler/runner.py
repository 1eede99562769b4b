"""Tensors in, logits out: turns a scheduled step into one varlen forward of the model.

Owns the per-layer KV caches ([num_blocks, block_size, Hkv, D] for the Triton decode kernel, head-major
[Hkv, num_blocks, block_size, D] for the torch path) and the PagedAttention backend. The model
is the training Llama, called with B=1, T=all tokens of the step and per-token positions; logits are
computed only for the rows that sample (the last token of each sequence with nothing left to compute).
A tensor-parallel shard (engine/sampler/tensor_parallel.py) is such a Llama with this rank's head counts in
model.config, so the caches below hold only its KV heads; its local logits are gathered along the vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .paged_attention import PagedAttention, StepLayout, build_layout
from .sequence import Sequence

# Carried decode K/V (torch path, see paged_attention): at most this many bytes, room for this many more
# tokens per rebuild (a rebuild is one gather, as every step costs without it).
DENSE_DECODE_BYTES = 512 << 20
DENSE_HEADROOM_BLOCKS = 4

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8
    return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * elem


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, attention_impl: str = "auto",
                 cuda_graphs: bool = True, max_num_seqs: int = 256):
        self.model = model
        self.tp = getattr(model, "tp", None)  # TPState of a tensor-parallel shard, else None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        if attention_impl not in ("auto", "torch", "triton"):
            raise ValueError(f"sampler: attention_impl={attention_impl!r} (expected 'auto', 'torch' or 'triton')")
        self.triton_decode = attention_impl == "triton" or (attention_impl == "auto" and self.device.type == "cuda")
        self.backend: PagedAttention | None = None
        self.dense_prev: tuple[list[int], list[int], int] | None = None  # decode seq ids, contexts, cap
        # Decode steps are launch-bound (hundreds of small kernels per token): replay them as CUDA graphs.
        self.graphs = DecodeGraphs(self, max_num_seqs) if cuda_graphs and self.triton_decode and \
            self.device.type == "cuda" else None

    def allocate_cache(self) -> None:
        if self.backend is not None:
            return
        c = self.model.config
        # One block more than the manager hands out: padded graph rows write their K/V there.
        shape = (self.num_blocks + 1, self.block_size, c.n_kv_heads, c.head_dim) if self.triton_decode else \
            (c.n_kv_heads, self.num_blocks + 1, self.block_size, c.head_dim)
        # Zeros, not empty: padded lanes of a gather read never-written slots, and 0 * NaN would poison SDPA.
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layers)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layers)]
        self.backend = PagedAttention(k, v, self.triton_decode)

    def free_cache(self) -> None:
        self.backend = None
        self.dense_prev = None
        if self.graphs is not None:
            self.graphs.clear()

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Compute the scheduled tokens; returns the sequences that sample now and their fp32 logits [S, V]."""
        self.allocate_cache()
        decode = [(seq, n) for seq, n in scheduled if n == 1]
        prefill = [(seq, n) for seq, n in scheduled if n > 1]
        if self.graphs is not None and not prefill and len(decode) <= self.graphs.max_batch and all(
                seq.num_computed + 1 == len(seq.token_ids) for seq, _ in decode):
            seqs = [seq for seq, _ in decode]
            return seqs, self.graphs.run(seqs)
        input_ids, positions = [], []
        for seq, _ in decode:
            input_ids.append(seq.token_ids[seq.num_computed])
            positions.append(seq.num_computed)
        for seq, n in prefill:
            input_ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            positions.extend(range(seq.num_computed, seq.num_computed + n))
        dense_mode, dense_cap, dense_state = self._dense_plan(decode)
        self.dense_prev = None  # stays None if the forward fails midway (the carried K/V are then stale)
        self.backend.layout = build_layout(
            [(seq.block_table, seq.num_computed + 1) for seq, _ in decode],
            [(seq.block_table, seq.num_computed, n) for seq, n in prefill],
            self.block_size, self.device, self.triton_decode, self.model.config.n_kv_heads, self.num_blocks + 1,
            dense_mode, dense_cap,
        )
        sampling, rows, row = [], [], 0
        for seq, n in decode + prefill:
            row += n
            if seq.num_computed + n == len(seq.token_ids):
                sampling.append(seq)
                rows.append(row - 1)
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model(ids[None], positions=pos[None], attn_backend=self.backend, return_hidden=True)[0]
        self.backend.layout = None
        self.dense_prev = dense_state
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

    def _dense_plan(self, decode: list[tuple[Sequence, int]]):
        """("step" | "build" | None, cap, state to remember): step when the decode batch is last step's,
        same order, each one token further, and still fits the carried K/V."""
        if self.triton_decode or not decode:
            return None, 0, None
        ids = [seq.seq_id for seq, _ in decode]
        ctx = [seq.num_computed + 1 for seq, _ in decode]
        longest = max(ctx)
        prev = self.dense_prev
        if prev is not None and prev[0] == ids and longest <= prev[2] and \
                all(c == p + 1 for c, p in zip(ctx, prev[1])):
            return "step", prev[2], (ids, ctx, prev[2])
        c = self.model.config
        cap = (-(-longest // self.block_size) + DENSE_HEADROOM_BLOCKS) * self.block_size
        elem = torch.finfo(self.dtype).bits // 8
        if 2 * c.n_layers * len(decode) * c.n_kv_heads * cap * c.head_dim * elem > DENSE_DECODE_BYTES:
            return None, 0, None
        return "build", cap, (ids, ctx, cap)


class DecodeGraphs:
    """CUDA graphs of the decode-only step (one new token per sequence), one per batch-size bucket.

    Captured lazily on first use. Inputs live in static buffers; rows beyond the real batch write their
    K/V into the spare block and have context length 0 (the decode kernel returns zeros for them).
    The graphs hold the model's parameter addresses: in-place weight updates are seen, replaced
    parameter tensors are not (build a new Sampler for a new model object)."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int):
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
        r.backend.layout = StepLayout(slot_mapping=b["slot"][:bs], num_decode=bs,
                                      decode_block_tables=b["tables"][:bs], decode_context_lens=b["ctx"][:bs])
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
        self.runner.backend.layout = None
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
