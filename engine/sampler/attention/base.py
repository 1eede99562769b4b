"""What both paged attention backends share: the interface the runner drives, and the parts of a step's
metadata that do not depend on the cache layout (slot mapping, prefill chunks grouped by length).

A step's batch is one row of T tokens: first the sequences computing a single token (decode, or the
last token of a prompt), then the multi-token chunks (prefill). Per layer a backend first writes every
new K/V into the cache through the slot mapping, then attends: all writes of a step precede all reads,
which is what lets a sequence read prefix blocks that another sequence of the same step is filling.
Masks are explicit booleans aligned bottom-right (query i of a chunk starting at position p sees keys
0..p+i; SDPA's is_causal would align the diagonal top-left instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..sequence import Sequence


class PagedAttentionBackend:
    """One layer's attention over the paged K/V cache, called by model.llama.Llama through its
    AttentionBackend hook. Owns the per-layer caches (num_blocks + 1 blocks: the spare one takes the K/V
    of padded CUDA-graph rows) and the current step's metadata.

    Per step the runner calls prepare(decode, prefill) (metadata built on the host, moved once, reused by
    every layer), runs the model forward, then finish(). decode: sequences computing one token each (at
    position num_computed); prefill: (sequence, tokens) chunks starting at num_computed."""

    name = ""
    supports_cuda_graphs = False  # whether DecodeGraphs may capture its decode step

    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.cache_blocks = num_blocks + 1
        self.n_layers, self.num_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.dtype, self.device = dtype, device
        shape = self.cache_shape(self.cache_blocks, block_size, config.n_kv_heads, config.head_dim)
        # Zeros, not empty: padded lanes of a gather read never-written slots, and 0 * NaN would poison SDPA.
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.layout = None

    @staticmethod
    def cache_shape(blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        raise NotImplementedError

    def prepare(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """The step's forward completed."""
        self.layout = None

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class PrefillGroup:
    """Prefill chunks padded to a common query length: grouping by length keeps one long chunk (say an
    uncached prompt) from padding every short one (its cache-hit siblings) to its length."""

    q_index: torch.Tensor  # [G, Qg] long: token index among the step's prefill tokens
    q_valid: torch.Tensor  # [G, Qg] bool
    gather: torch.Tensor  # the backend's K/V rows or blocks of the group's block tables
    mask: torch.Tensor  # [G, 1, Qg, MBg * block_size] bool
    rows: torch.Tensor | None  # [valid tokens] long: where the outputs go among prefill tokens (None: in order)


def pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(bt) for bt in tables)
    return torch.tensor([bt + [0] * (width - len(bt)) for bt in tables], dtype=torch.long)


def length_groups(q_lens: list[int]) -> list[list[int]]:
    """Indices grouped by query length: a group holds the lengths above half its longest. Each group lists
    its members in step order, so a single group is the step's token order."""
    order = sorted(range(len(q_lens)), key=lambda i: -q_lens[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and 2 * q_lens[i] > q_lens[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def decode_tables(decode: list[Sequence], block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(padded block tables [Sd, MB], context lengths [Sd], cache slot of each new token [Sd]) on the host."""
    tables = pad_tables([seq.block_table for seq in decode])
    ctx = torch.tensor([seq.num_computed + 1 for seq in decode], dtype=torch.long)
    last = ctx - 1
    slots = tables.gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    return tables, ctx, slots


def prefill_layout(prefill: list[tuple[Sequence, int]], block_size: int, device: torch.device,
                   gather: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[PrefillGroup]]:
    """(cache slot of each prefill token on the host, its groups); gather maps a group's [G, MBg] block
    tables to the backend's own index tensor."""
    tables = pad_tables([seq.block_table for seq, _ in prefill])
    start = torch.tensor([seq.num_computed for seq, _ in prefill], dtype=torch.long)
    q_len = torch.tensor([n for _, n in prefill], dtype=torch.long)
    length, max_q = tables.shape[1] * block_size, int(q_len.max())
    steps = torch.arange(max_q)
    q_pos = start[:, None] + steps[None]  # [Sp, Qp] absolute position of each query
    valid = steps[None] < q_len[:, None]
    q_pos_c = q_pos.clamp(max=length - 1)
    slots = tables.gather(1, q_pos_c // block_size) * block_size + q_pos_c % block_size
    first = torch.cumsum(q_len, 0) - q_len
    total = int(q_len.sum())
    groups = length_groups([n for _, n in prefill])
    out = []
    for members in groups:
        g = torch.tensor(members, dtype=torch.long)
        g_len, g_start = q_len[g], start[g]
        g_q = int(g_len.max())
        g_blocks = -(-int((g_start + g_len).max()) // block_size)
        g_steps = torch.arange(g_q)
        g_pos = g_start[:, None] + g_steps[None]
        g_valid = g_steps[None] < g_len[:, None]
        g_index = (first[g][:, None] + g_steps[None]).clamp(max=total - 1)
        keep = torch.arange(g_blocks * block_size)[None, None] <= g_pos[:, :, None]  # causal, bottom-right
        out.append(PrefillGroup(
            q_index=g_index.to(device), q_valid=g_valid.to(device), gather=gather(tables[g, :g_blocks]).to(device),
            mask=keep[:, None].to(device), rows=None if len(groups) == 1 else g_index[g_valid].to(device),
        ))
    return slots[valid], out


def attend_prefill(q: torch.Tensor, attend, groups: list[PrefillGroup]) -> torch.Tensor:
    """q [Tp, Hq, D] the prefill tokens; attend(q [G, Qg, Hq, D], group) -> [G, Qg, Hq, D]. Returns [Tp, Hq, D]."""
    if len(groups) == 1:
        g = groups[0]
        return attend(q[g.q_index], g)[g.q_valid]
    out = torch.empty_like(q)
    for g in groups:
        out.index_copy_(0, g.rows, attend(q[g.q_index], g)[g.q_valid])
    return out
