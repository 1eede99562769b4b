"""Paged-attention decode: one query token per sequence attends to its K/V through a block table.

k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [S, max_blocks] int (padding entries
are never read past context_lens); context_lens: [S] int (the query sits at position context_len - 1 and
sees every key up to it). q: [S, Hq, D] with Hq a multiple of Hkv (grouped-query attention: query head h
reads kv head h // (Hq // Hkv)). One Triton program per (sequence, kv head) serves all query heads of
the group, so each K/V tile is loaded once per group. `paged_decode_attention_reference` is the plain
torch definition the kernel is tested against.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    Q, K, V, BlockTables, ContextLens, Out, scale,
    stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_bts, stride_os, stride_oh,
    REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D_P)
    r_ok = r < REP
    d_ok = d < D
    q_heads = kv_head * REP + r
    q = tl.load(Q + seq * stride_qs + q_heads[:, None] * stride_qh + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
    ctx = tl.load(ContextLens + seq)
    m = tl.full([REP_P], float("-inf"), tl.float32)
    l = tl.zeros([REP_P], tl.float32)
    acc = tl.zeros([REP_P, D_P], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_ok = pos < ctx
        block = tl.load(BlockTables + seq * stride_bts + pos // BLOCK_SIZE, mask=p_ok, other=0)
        offs = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        kv_mask = p_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [REP_P, BLOCK_N]
        scores = tl.where(r_ok[:, None] & p_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        # A lane that has seen only padding keeps m = -inf; exp(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(Out + seq * stride_os + q_heads[:, None] * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def _check(q, k_cache, v_cache, block_tables, context_lens):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_decode_attention: expected q [S,Hq,D] and caches [N,B,Hkv,D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"paged_decode_attention: q heads/dim {tuple(q.shape[1:])} do not fit kv "
                         f"{tuple(k_cache.shape[2:])}")
    if block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError("paged_decode_attention: block_tables/context_lens must have one row per sequence")


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    """Plain torch: gather each sequence's keys through its block table, softmax in the input dtype's
    higher-precision companion (fp32, or fp64 for fp64 inputs). A sequence with no context gets zeros."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    S, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(S, Hq, D, dtype=q.dtype, device=q.device)
    for s in range(S):
        n = int(context_lens[s])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[s].long()[pos // block_size]
        k = k_cache[blocks, pos % block_size].to(acc_dtype)  # [n, Hkv, D]
        v = v_cache[blocks, pos % block_size].to(acc_dtype)
        rep = Hq // Hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [n, Hq, D]
        scores = torch.einsum("hd,nhd->hn", q[s].to(acc_dtype), k) * scale
        out[s] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None, impl="auto",
                           block_n: int | None = None):
    """[S, Hq, D] attention output for one query token per sequence over the paged cache."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    if impl != "triton":
        raise ValueError(f"paged_decode_attention: impl={impl!r} (expected 'auto', 'torch' or 'triton')")
    _check(q, k_cache, v_cache, block_tables, context_lens)
    if q.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("paged_decode_attention: q must have unit last stride and the caches must be contiguous")
    S, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    rep = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    out = torch.empty(S, Hq, D, dtype=q.dtype, device=q.device)
    if block_n is None:
        block_n = max(block_size, 64 if rep <= 4 else 32)
    _paged_decode_kernel[(S, Hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        REP=rep, REP_P=triton.next_power_of_2(rep), D=D, D_P=triton.next_power_of_2(D),
        BLOCK_SIZE=block_size, BLOCK_N=triton.next_power_of_2(block_n),
    )
    return out
