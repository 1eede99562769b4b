"""The torch backend (CPU, or any device without Triton): gathered K/V, explicit masks, SDPA or matmuls.

Its caches are head-major, [Hkv, num_blocks, block_size, D], so one index_select of whole (head, block)
runs lands K/V already in the contiguous [S, Hkv, L, D] order (a strided K costs CPU SDPA ~3x); the gather
indices are built once per step and reused by every layer, and the gathers write into buffers kept across
layers and steps (fresh multi-MB tensors each layer cost more in page faults than the copy itself). Prefill
chunks are attended in groups of similar length (SDPA), so one long chunk does not pad every short one.
Decode goes further: each layer keeps its decode batch's padded K/V [S, Hkv, cap, D] across steps
("dense"), so while the batch stays the same sequences in the same order a step appends one token per
sequence instead of re-gathering every context (a changed batch, or a context past cap, rebuilds it with
one gather), and attends with plain matmuls (fp32: faster than CPU SDPA for one query row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sequence import Sequence
from .base import PagedAttentionBackend, PrefillGroup, attend_prefill, decode_tables, prefill_layout

# Carried decode K/V: at most this many bytes, room for this many more tokens per rebuild (a rebuild is
# one gather, as every step costs without it).
DENSE_DECODE_BYTES = 512 << 20
DENSE_HEADROOM_BLOCKS = 4


@dataclass
class TorchStep:
    """Where this step's tokens live in the head-major cache and what each may see."""

    num_decode: int  # the first num_decode tokens are single-token queries, one per sequence
    write_index: torch.Tensor  # [Hkv * T] long: head-major cache row of each new (head, token)
    decode_gather: torch.Tensor | None = None  # [Sd * Hkv * MB] long: (head, block) rows
    decode_mask: torch.Tensor | None = None  # [Sd, 1, 1, L] bool (L = MB * block_size, or max context if dense)
    dense_mode: str | None = None  # None: gather per layer; "build": gather into the dense K/V; "step": append
    dense_cap: int = 0  # positions per row of the dense K/V
    dense_write: torch.Tensor | None = None  # [Sd * Hkv] long: row of each new (sequence, head) in [Sd*Hkv*cap, D]
    prefill_groups: list[PrefillGroup] | None = None  # gather: [G * Hkv * MBg] long head-major rows


def head_major_rows(tables: torch.Tensor, num_kv_heads: int, cache_blocks: int) -> torch.Tensor:
    """[S, MB] block ids -> [S * Hkv * MB] rows of the [Hkv * cache_blocks, block_size, D] cache view."""
    heads = torch.arange(num_kv_heads)[None, :, None] * cache_blocks
    return (heads + tables[:, None, :]).reshape(-1)


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


class TorchPagedAttention(PagedAttentionBackend):
    name = "torch"

    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__(config, num_blocks, block_size, dtype, device)
        self.buffers = _GatherBuffers()
        self.dense = _DenseDecode()
        self.dense_prev: tuple[list[int], list[int], int] | None = None  # decode seq ids, contexts, cap
        self._dense_next = None

    @staticmethod
    def cache_shape(blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_kv_heads, blocks, block_size, head_dim)

    def _dense_plan(self, decode: list[Sequence]):
        """("step" | "build" | None, cap, state to remember): step when the decode batch is last step's,
        same order, each one token further, and still fits the carried K/V."""
        if not decode:
            return None, 0, None
        ids = [seq.seq_id for seq in decode]
        ctx = [seq.num_computed + 1 for seq in decode]
        longest = max(ctx)
        prev = self.dense_prev
        if prev is not None and prev[0] == ids and longest <= prev[2] and \
                all(c == p + 1 for c, p in zip(ctx, prev[1])):
            return "step", prev[2], (ids, ctx, prev[2])
        cap = (-(-longest // self.block_size) + DENSE_HEADROOM_BLOCKS) * self.block_size
        elem = torch.finfo(self.dtype).bits // 8
        if 2 * self.n_layers * len(decode) * self.num_kv_heads * cap * self.head_dim * elem > DENSE_DECODE_BYTES:
            return None, 0, None
        return "build", cap, (ids, ctx, cap)

    def prepare(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> None:
        dense_mode, dense_cap, self._dense_next = self._dense_plan(decode)
        self.dense_prev = None  # stays None if the forward fails midway (the carried K/V are then stale)
        device, block_size, Hkv = self.device, self.block_size, self.num_kv_heads
        slot_parts = []
        lay = TorchStep(num_decode=len(decode), write_index=None, dense_mode=dense_mode, dense_cap=dense_cap)
        if decode:
            tables, ctx, slots = decode_tables(decode, block_size)
            slot_parts.append(slots)
            last = ctx - 1
            width = tables.shape[1] * block_size
            if dense_mode is not None:
                width = int(ctx.max())
                if dense_mode == "build":
                    tables = F.pad(tables, (0, dense_cap // block_size - tables.shape[1]))
                else:
                    rows = torch.arange(len(decode))[:, None] * Hkv + torch.arange(Hkv)[None]
                    lay.dense_write = (rows * dense_cap + last[:, None]).reshape(-1).to(device, non_blocking=True)
            if dense_mode != "step":
                lay.decode_gather = head_major_rows(tables, Hkv, self.cache_blocks).to(device, non_blocking=True)
            mask = torch.arange(width)[None] < ctx[:, None]
            lay.decode_mask = mask[:, None, None].to(device, non_blocking=True)
        if prefill:
            slots, lay.prefill_groups = prefill_layout(
                prefill, block_size, device, lambda t: head_major_rows(t, Hkv, self.cache_blocks))
            slot_parts.append(slots)
        slot_mapping = torch.cat(slot_parts)
        # Row of (head h, token t) in the head-major [Hkv * cache_blocks * block_size, D] view, h-major.
        heads = torch.arange(Hkv)[:, None] * (self.cache_blocks * block_size)
        lay.write_index = (heads + slot_mapping[None]).reshape(-1).to(device, non_blocking=True)
        self.layout = lay

    def finish(self) -> None:
        self.layout = None
        self.dense_prev = self._dense_next

    def _decode_dense(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        """q [S, Hq, D]; k_new/v_new [S, Hkv, D] this step's K/V of the decode tokens -> [S, Hq, D]."""
        lay = self.layout
        S, Hq, D = q.shape
        Hkv, cap = k_new.shape[1], lay.dense_cap
        k, v = self.dense.get(layer, (S, Hkv, cap, D), k_rows)
        if lay.dense_mode == "build":  # the paged cache already holds this step's token
            torch.index_select(k_rows, 0, lay.decode_gather, out=k.view(-1, k_rows.shape[1], D))
            torch.index_select(v_rows, 0, lay.decode_gather, out=v.view(-1, v_rows.shape[1], D))
        else:
            k.view(-1, D).index_copy_(0, lay.dense_write, k_new.reshape(-1, D).to(k.dtype))
            v.view(-1, D).index_copy_(0, lay.dense_write, v_new.reshape(-1, D).to(v.dtype))
        length = lay.decode_mask.shape[-1]
        qg = q.reshape(S, Hkv, Hq // Hkv, D)  # query heads sharing a kv head as the query axis (GQA)
        return _masked_attention(qg, k[:, :, :length], v[:, :, :length], lay.decode_mask).reshape(S, Hq, D)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        q, k, v = q[0], k[0], v[0]  # [T, H, D]
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        D, block_size = k_cache.shape[3], k_cache.shape[2]
        k_flat, v_flat = k_cache.view(-1, D), v_cache.view(-1, D)
        k_flat.index_copy_(0, lay.write_index, k.to(k_flat.dtype).transpose(0, 1).reshape(-1, D))
        v_flat.index_copy_(0, lay.write_index, v.to(v_flat.dtype).transpose(0, 1).reshape(-1, D))
        k_rows, v_rows = k_cache.view(-1, block_size, D), v_cache.view(-1, block_size, D)
        outs = []
        nd = lay.num_decode
        if nd and lay.dense_mode is not None:
            outs.append(self._decode_dense(layer_idx, q[:nd], k[:nd], v[:nd], k_rows, v_rows))
        elif nd:
            outs.append(_attend_gathered(q[:nd, None], k_rows, v_rows, lay.decode_gather, lay.decode_mask,
                                         self.buffers)[:, 0])
        if lay.prefill_groups:
            outs.append(attend_prefill(q[nd:], lambda qp, g: _attend_gathered(qp, k_rows, v_rows, g.gather, g.mask,
                                                                               self.buffers), lay.prefill_groups))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[None]
