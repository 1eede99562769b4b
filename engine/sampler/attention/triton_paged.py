"""The Triton backend (CUDA; the Triton interpreter on CPU for tests): single-token queries go to the paged
decode kernel (kernels/paged_attention.py), which reads K/V through the block tables in place, and prefill
chunks gather their blocks and attend with SDPA. Caches are block-major, [num_blocks, block_size, Hkv, D],
the layout the kernel reads. Its decode step has fixed shapes given the batch size, so DecodeGraphs can
capture it: bind_decode points the step at the graph's static buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_decode_attention

from ..sequence import Sequence
from .base import PagedAttentionBackend, PrefillGroup, attend_prefill, decode_tables, prefill_layout


@dataclass
class TritonStep:
    """Where this step's tokens live in the block-major cache and what each may see."""

    num_decode: int  # the first num_decode tokens are single-token queries, one per sequence
    slot_mapping: torch.Tensor  # [T] long: flat cache slot of each new token (block * block_size + offset)
    decode_block_tables: torch.Tensor | None = None  # [Sd, MB] int32
    decode_context_lens: torch.Tensor | None = None  # [Sd] int32 (0: a padded row, the kernel returns zeros)
    prefill_groups: list[PrefillGroup] | None = None  # gather: [G, MBg] long block tables


def _attend_block_major(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Prefill on the block-major caches: q [S, Q, Hq, D]; blocks [S, MB] -> [S, Q, Hq, D]."""
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


class TritonPagedAttention(PagedAttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    @staticmethod
    def cache_shape(blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (blocks, block_size, num_kv_heads, head_dim)

    def prepare(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> None:
        device, slot_parts = self.device, []
        lay = TritonStep(num_decode=len(decode), slot_mapping=None)
        if decode:
            tables, ctx, slots = decode_tables(decode, self.block_size)
            slot_parts.append(slots)
            lay.decode_block_tables = tables.to(torch.int32).to(device, non_blocking=True)
            lay.decode_context_lens = ctx.to(torch.int32).to(device, non_blocking=True)
        if prefill:
            slots, lay.prefill_groups = prefill_layout(prefill, self.block_size, device, lambda t: t)
            slot_parts.append(slots)
        lay.slot_mapping = torch.cat(slot_parts).to(device, non_blocking=True)
        self.layout = lay

    def bind_decode(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor) -> None:
        """A decode-only step whose metadata already sits on the device (a CUDA graph's static buffers)."""
        self.layout = TritonStep(num_decode=slot_mapping.shape[0], slot_mapping=slot_mapping,
                                 decode_block_tables=block_tables, decode_context_lens=context_lens)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        q, k, v = q[0], k[0], v[0]  # [T, H, D]
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        Hkv, D = k_cache.shape[2], k_cache.shape[3]
        k_flat, v_flat = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
        k_flat.index_copy_(0, lay.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, lay.slot_mapping, v.to(v_flat.dtype))
        outs = []
        nd = lay.num_decode
        if nd:
            outs.append(paged_decode_attention(q[:nd], k_cache, v_cache, lay.decode_block_tables,
                                               lay.decode_context_lens, impl="triton"))
        if lay.prefill_groups:
            outs.append(attend_prefill(q[nd:], lambda qp, g: _attend_block_major(qp, k_cache, v_cache, g.gather,
                                                                                 g.mask), lay.prefill_groups))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[None]
