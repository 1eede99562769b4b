"""The attention backend the sampler plugs into model.llama.Llama: paged K/V cache, varlen batch.

A step's batch is one row of T tokens: first the sequences computing a single token (decode, or the
last token of a prompt), then the multi-token chunks (prefill). Per layer the backend first writes every
new K/V into the cache through the slot mapping, then attends: all writes of a step precede all reads,
which is what lets a sequence read prefix blocks that another sequence of the same step is filling.

Torch path: gather each sequence's keys into a padded [S, Hkv, L, D] layout and attend with an explicit
boolean mask (query i of a chunk starting at position p sees keys 0..p+i; SDPA's is_causal would align the
diagonal top-left instead). Its caches are head-major, [Hkv, num_blocks, block_size, D], so one
index_select of whole (head, block) runs lands K/V already in the contiguous [S, Hkv, L, D] order (a
strided K costs CPU SDPA ~3x); the gather indices are built once per step and reused by every layer, and
the gathers write into buffers kept across layers and steps (fresh multi-MB tensors each layer cost more
in page faults than the copy itself). Prefill chunks are attended in groups of similar length (SDPA), so
one long chunk does not pad every short one. Decode goes further: each layer keeps its decode batch's
padded K/V [S, Hkv, cap, D] across steps ("dense"), so while the batch stays the same sequences in the
same order a step appends one token per sequence instead of re-gathering every context (a changed batch,
or a context past cap, rebuilds it with one gather), and attends with plain matmuls (fp32: faster than
CPU SDPA for one query row). On CUDA, single-token queries go to the Triton paged decode kernel, which
reads the block-major [num_blocks, block_size, Hkv, D] caches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_decode_attention


@dataclass
class StepLayout:
    """Where this step's tokens live in the cache and what each may see (built once per step)."""

    slot_mapping: torch.Tensor  # [T] long: flat cache slot of each new token (block * block_size + offset)
    num_decode: int  # the first num_decode tokens are single-token queries, one per sequence
    write_index: torch.Tensor | None = None  # [Hkv * T] long: head-major cache row of each new (head, token)
    decode_gather: torch.Tensor | None = None  # [Sd * Hkv * MB] long: (head, block) rows, head-major cache
    decode_mask: torch.Tensor | None = None  # [Sd, 1, 1, L] bool (L = MB * block_size, or max context if dense)
    dense_mode: str | None = None  # None: gather per layer; "build": gather into the dense K/V; "step": append
    dense_cap: int = 0  # positions per row of the dense K/V
    dense_write: torch.Tensor | None = None  # [Sd * Hkv] long: row of each new (sequence, head) in [Sd*Hkv*cap, D]
    decode_block_tables: torch.Tensor | None = None  # [Sd, MB] int32 (Triton path)
    decode_context_lens: torch.Tensor | None = None  # [Sd] int32 (Triton path)
    prefill_groups: list[PrefillGroup] | None = None  # chunks of similar length, attended together


@dataclass
class PrefillGroup:
    """Prefill chunks padded to a common query length: grouping by length keeps one long chunk (say an
    uncached prompt) from padding every short one (its cache-hit siblings) to its length."""

    q_index: torch.Tensor  # [G, Qg] long: token index among the step's prefill tokens
    q_valid: torch.Tensor  # [G, Qg] bool
    gather: torch.Tensor  # [G * Hkv * MBg] long head-major rows; Triton path: [G, MBg] block table
    mask: torch.Tensor  # [G, 1, Qg, MBg * block_size] bool
    rows: torch.Tensor | None  # [valid tokens] long: where the outputs go among prefill tokens (None: in order)


def _length_groups(q_lens: list[int]) -> list[list[int]]:
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


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(bt) for bt in tables)
    return torch.tensor([bt + [0] * (width - len(bt)) for bt in tables], dtype=torch.long)


def _head_major_rows(tables: torch.Tensor, num_kv_heads: int, cache_blocks: int) -> torch.Tensor:
    """[S, MB] block ids -> [S * Hkv * MB] rows of the [Hkv * cache_blocks, block_size, D] cache view."""
    heads = torch.arange(num_kv_heads)[None, :, None] * cache_blocks
    return (heads + tables[:, None, :]).reshape(-1)


def build_layout(decode: list[tuple[list[int], int]], prefill: list[tuple[list[int], int, int]], block_size: int,
                 device: torch.device, triton_decode: bool, num_kv_heads: int = 1,
                 cache_blocks: int = 0, dense_mode: str | None = None, dense_cap: int = 0) -> StepLayout:
    """decode: (block_table, context_len) per single-token sequence; prefill: (block_table, start, num_tokens).
    num_kv_heads and cache_blocks (blocks per head in the head-major caches) shape the torch-path indices;
    dense_mode/dense_cap select the carried decode K/V (torch path only, see the module docstring)."""
    slot_parts = []
    layout = StepLayout(slot_mapping=None, num_decode=len(decode), dense_mode=dense_mode, dense_cap=dense_cap)
    decode_gather = not triton_decode
    if decode:
        tables = _pad_tables([bt for bt, _ in decode])
        ctx = torch.tensor([n for _, n in decode], dtype=torch.long)
        last = ctx - 1
        slot_parts.append(tables.gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size)
        if not decode_gather:
            layout.decode_block_tables = tables.to(torch.int32).to(device, non_blocking=True)
            layout.decode_context_lens = ctx.to(torch.int32).to(device, non_blocking=True)
        else:
            width = tables.shape[1] * block_size
            if dense_mode is not None:
                width = int(ctx.max())
                if dense_mode == "build":
                    tables = F.pad(tables, (0, dense_cap // block_size - tables.shape[1]))
                else:
                    rows = torch.arange(len(decode))[:, None] * num_kv_heads + torch.arange(num_kv_heads)[None]
                    layout.dense_write = (rows * dense_cap + last[:, None]).reshape(-1).to(device, non_blocking=True)
            if dense_mode != "step":
                rows = _head_major_rows(tables, num_kv_heads, cache_blocks)
                layout.decode_gather = rows.to(device, non_blocking=True)
            mask = torch.arange(width)[None] < ctx[:, None]
            layout.decode_mask = mask[:, None, None].to(device, non_blocking=True)
    if prefill:
        tables = _pad_tables([bt for bt, _, _ in prefill])
        start = torch.tensor([s for _, s, _ in prefill], dtype=torch.long)
        q_len = torch.tensor([n for _, _, n in prefill], dtype=torch.long)
        length, max_q = tables.shape[1] * block_size, int(q_len.max())
        steps = torch.arange(max_q)
        q_pos = start[:, None] + steps[None]  # [Sp, Qp] absolute position of each query
        valid = steps[None] < q_len[:, None]
        q_pos_c = q_pos.clamp(max=length - 1)
        slots = tables.gather(1, q_pos_c // block_size) * block_size + q_pos_c % block_size
        slot_parts.append(slots[valid])
        first = torch.cumsum(q_len, 0) - q_len
        total = int(q_len.sum())
        layout.prefill_groups = []
        groups = _length_groups([n for _, _, n in prefill])
        for members in groups:
            g = torch.tensor(members, dtype=torch.long)
            g_len, g_start = q_len[g], start[g]
            g_q = int(g_len.max())
            g_blocks = -(-int((g_start + g_len).max()) // block_size)
            g_steps = torch.arange(g_q)
            g_pos = g_start[:, None] + g_steps[None]
            g_valid = g_steps[None] < g_len[:, None]
            g_index = (first[g][:, None] + g_steps[None]).clamp(max=total - 1)
            g_tables = tables[g, :g_blocks]
            keep = torch.arange(g_blocks * block_size)[None, None] <= g_pos[:, :, None]  # causal, bottom-right
            layout.prefill_groups.append(PrefillGroup(
                q_index=g_index.to(device), q_valid=g_valid.to(device),
                gather=(g_tables if triton_decode else
                        _head_major_rows(g_tables, num_kv_heads, cache_blocks)).to(device),
                mask=keep[:, None].to(device),
                rows=None if len(groups) == 1 else g_index[g_valid].to(device),
            ))
    slot_mapping = torch.cat(slot_parts)
    layout.slot_mapping = slot_mapping.to(device, non_blocking=True)
    if not triton_decode:
        # Row of (head h, token t) in the head-major [Hkv * cache_blocks * block_size, D] view, h-major.
        heads = torch.arange(num_kv_heads)[:, None] * (cache_blocks * block_size)
        layout.write_index = (heads + slot_mapping[None]).reshape(-1).to(device, non_blocking=True)
    return layout


class _GatherBuffers:
    """Grow-only K/V gather destinations, reused by every layer and step (see the module docstring)."""

    def __init__(self):
        self.k = self.v = None

    def get(self, numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.k.numel() < numel:
            self.k = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.v = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self.k[:numel], self.v[:numel]


class _DenseDecode:
    """Per-layer decode K/V [S, Hkv, cap, D] carried across steps (grow-only storage)."""

    def __init__(self):
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []

    def get(self, layer: int, shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        if self.k[layer] is None or self.k[layer].numel() < numel:
            self.k[layer] = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self.k[layer][:numel].view(shape), self.v[layer][:numel].view(shape)


def _decode_dense(layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_rows: torch.Tensor,
                  v_rows: torch.Tensor, lay: StepLayout, dense: _DenseDecode) -> torch.Tensor:
    """q [S, Hq, D]; k_new/v_new [S, Hkv, D] this step's K/V of the decode tokens -> [S, Hq, D]."""
    S, Hq, D = q.shape
    Hkv, cap = k_new.shape[1], lay.dense_cap
    k, v = dense.get(layer, (S, Hkv, cap, D), k_rows)
    if lay.dense_mode == "build":  # the paged cache already holds this step's token
        torch.index_select(k_rows, 0, lay.decode_gather, out=k.view(-1, k_rows.shape[1], D))
        torch.index_select(v_rows, 0, lay.decode_gather, out=v.view(-1, v_rows.shape[1], D))
    else:
        k.view(-1, D).index_copy_(0, lay.dense_write, k_new.reshape(-1, D).to(k.dtype))
        v.view(-1, D).index_copy_(0, lay.dense_write, v_new.reshape(-1, D).to(v.dtype))
    length = lay.decode_mask.shape[-1]
    qg = q.reshape(S, Hkv, Hq // Hkv, D)  # query heads sharing a kv head as the query axis (GQA)
    return _masked_attention(qg, k[:, :, :length], v[:, :, :length], lay.decode_mask).reshape(S, Hq, D)


def _masked_attention(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """qg [S, Hkv, rep * Q, D] (row r * Q + i: query i of head kv * rep + r); k, v [S, Hkv, L, D];
    mask [S, 1, Q, L] bool (True = visible; every row sees at least one key) -> [S, Hkv, rep * Q, D]."""
    S, Hkv, RQ, D = qg.shape
    Q, L = mask.shape[2], mask.shape[3]
    if qg.dtype in (torch.float16, torch.bfloat16):  # SDPA accumulates these in fp32
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(1, 1, RQ // Q, 1) if RQ > Q else mask)
    # Plain matmuls, in place: on CPU fp32 with one query row per head, ~1.5x faster than SDPA.
    scores = torch.matmul(qg, k.transpose(-1, -2))
    scores.mul_(D ** -0.5).view(S, Hkv, RQ // Q, Q, L).masked_fill_(~mask[:, :, None], float("-inf"))
    torch.softmax(scores, -1, out=scores)
    return torch.matmul(scores, v)


def _attend_gathered(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, gather: torch.Tensor,
                     mask: torch.Tensor, buffers: _GatherBuffers) -> torch.Tensor:
    """q [S, Q, Hq, D]; k_rows/v_rows [Hkv * cache_blocks, block_size, D]; gather [S * Hkv * MB];
    mask [S, 1, Q, MB * block_size] -> [S, Q, Hq, D]."""
    S, Q, Hq, D = q.shape
    block_size = k_rows.shape[1]
    length = mask.shape[-1]
    Hkv = gather.numel() // (S * (length // block_size))
    rep = Hq // Hkv
    k_buf, v_buf = buffers.get(gather.numel() * block_size * D, k_rows)
    k = torch.index_select(k_rows, 0, gather, out=k_buf.view(-1, block_size, D)).view(S, Hkv, length, D)
    v = torch.index_select(v_rows, 0, gather, out=v_buf.view(-1, block_size, D)).view(S, Hkv, length, D)
    # Fold the query heads sharing a kv head into the query axis: GQA without repeating K/V.
    qg = q.permute(0, 2, 1, 3).reshape(S, Hkv, rep * Q, D)
    if Q > 1:  # SDPA: the plain-matmul path measured ~2x slower here (scores [S, Hkv, rep * Q, L])
        mask = mask.repeat(1, 1, rep, 1) if rep > 1 else mask
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    else:
        out = _masked_attention(qg, k, v, mask)
    return out.reshape(S, Hq, Q, D).permute(0, 2, 1, 3)


def _attend_block_major(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Triton-path prefill on the block-major caches: q [S, Q, Hq, D]; blocks [S, MB] -> [S, Q, Hq, D]."""
    S, Q, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    rep = Hq // Hkv
    length = blocks.shape[1] * k_cache.shape[1]
    k = k_cache.index_select(0, blocks.view(-1)).view(S, length, Hkv, D).transpose(1, 2)  # [S, Hkv, L, D]
    v = v_cache.index_select(0, blocks.view(-1)).view(S, length, Hkv, D).transpose(1, 2)
    qg = q.permute(0, 2, 1, 3).reshape(S, Hkv, rep * Q, D)
    if rep > 1 and Q > 1:
        mask = mask.repeat(1, 1, rep, 1)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return out.reshape(S, Hq, Q, D).permute(0, 2, 1, 3)


def _prefill(q: torch.Tensor, attend, groups: list[PrefillGroup]) -> torch.Tensor:
    """q [Tp, Hq, D] the prefill tokens; attend(q [G, Qg, Hq, D], group) -> [G, Qg, Hq, D]. Returns [Tp, Hq, D]."""
    if len(groups) == 1:
        g = groups[0]
        return attend(q[g.q_index], g)[g.q_valid]
    out = torch.empty_like(q)
    for g in groups:
        out.index_copy_(0, g.rows, attend(q[g.q_index], g)[g.q_valid])
    return out


class PagedAttention:
    """Callable per layer by Llama.forward; holds the per-layer caches and the current step's layout.

    Caches are [num_blocks, block_size, Hkv, D] with triton_decode, else head-major [Hkv, num_blocks,
    block_size, D] (see the module docstring)."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], triton_decode: bool):
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.triton_decode = triton_decode
        self.layout: StepLayout | None = None
        self.buffers = _GatherBuffers()
        self.dense = _DenseDecode()

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        q, k, v = q[0], k[0], v[0]  # [T, H, D]
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        outs = []
        nd = lay.num_decode
        if self.triton_decode:
            Hkv, D = k_cache.shape[2], k_cache.shape[3]
            k_flat, v_flat = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
            k_flat.index_copy_(0, lay.slot_mapping, k.to(k_flat.dtype))
            v_flat.index_copy_(0, lay.slot_mapping, v.to(v_flat.dtype))
            if nd:
                outs.append(paged_decode_attention(q[:nd], k_cache, v_cache, lay.decode_block_tables,
                                                   lay.decode_context_lens, impl="triton"))
            if lay.prefill_groups:
                outs.append(_prefill(q[nd:], lambda qp, g: _attend_block_major(qp, k_cache, v_cache, g.gather,
                                                                                  g.mask), lay.prefill_groups))
        else:
            Hkv, D = k_cache.shape[0], k_cache.shape[3]
            block_size = k_cache.shape[2]
            k_flat, v_flat = k_cache.view(-1, D), v_cache.view(-1, D)
            k_flat.index_copy_(0, lay.write_index, k.to(k_flat.dtype).transpose(0, 1).reshape(-1, D))
            v_flat.index_copy_(0, lay.write_index, v.to(v_flat.dtype).transpose(0, 1).reshape(-1, D))
            k_rows, v_rows = k_cache.view(-1, block_size, D), v_cache.view(-1, block_size, D)
            if nd and lay.dense_mode is not None:
                outs.append(_decode_dense(layer_idx, q[:nd], k[:nd], v[:nd], k_rows, v_rows, lay, self.dense))
            elif nd:
                outs.append(_attend_gathered(q[:nd, None], k_rows, v_rows, lay.decode_gather, lay.decode_mask,
                                             self.buffers)[:, 0])
            if lay.prefill_groups:
                outs.append(_prefill(q[nd:], lambda qp, g: _attend_gathered(qp, k_rows, v_rows, g.gather, g.mask,
                                                                               self.buffers), lay.prefill_groups))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[None]
