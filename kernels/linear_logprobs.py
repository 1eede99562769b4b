"""Fused lm_head + log_softmax + gather: per-token log p(target) without the [N, V] logits.

Triton kernels first, then the autograd.Function, then the public `linear_logprobs`.

Forward is one GEMM-shaped kernel over (token tile, vocab tile) output tiles with the softmax reduction
fused into its epilogue: each tile writes only its partial logsumexp (one fp32 per row per vocab tile)
and, where the target column falls inside it, the target logit. The tiny [V/BLOCK_V, N] partials are
combined in torch. Backward walks the vocabulary in chunks: a second GEMM-epilogue kernel recomputes
the chunk's logits and turns them straight into grad_logits = g * (onehot(target) - softmax) in the
input dtype; d_weight[chunk] = grad_logits^T @ hidden and d_hidden += grad_logits @ weight[chunk] then
run as plain cuBLAS matmuls. No [N, V]-sized buffer exists in either direction; the chunked plain-torch
twin lives in linear_logprobs_ref.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.impl import check_lm_head_inputs, is_interpreted, resolve_impl
from kernels.linear_logprobs_ref import linear_logprobs_torch

_WHERE = "kernels/linear_logprobs.py"


@triton.jit
def _tile_logits(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows[:, None] * stride_h + ks[None, :]
    w_ptrs = weight_ptr + cols[None, :] * stride_w + ks[:, None]
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + ks) < H
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if CAST_F32:  # the interpreter's bf16 dot is wrong; fp32 tiles give exact products
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _tile_ids(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    # Grouped ordering: GROUP_N token tiles sweep the vocab together so weight tiles are reused from L2.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * tiles_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    return pid_n, pid_v


@triton.jit
def _lse_fwd_kernel(hidden_ptr, weight_ptr, targets_ptr, part_max_ptr, part_sum_ptr, target_logit_ptr,
                    N, V, H, stride_h, stride_w,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_N: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, pid_v = _tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    logits = _tile_logits(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                          BLOCK_N, BLOCK_V, BLOCK_K, CAST_F32, PRECISION)
    # Every tile holds >= 1 real column, so the row max is finite and no (-inf) - (-inf) appears.
    masked = tl.where(col_ok[None, :], logits, float("-inf"))
    row_max = tl.max(masked, axis=1)
    row_sum = tl.sum(tl.exp(masked - row_max[:, None]), axis=1)
    # max and sum stay separate (no max + log(sum) here): see the lse note in TritonLinearLogprobs.
    tl.store(part_max_ptr + pid_v * N + rows, row_max, mask=row_ok)
    tl.store(part_sum_ptr + pid_v * N + rows, row_sum, mask=row_ok)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    is_target = cols[None, :] == targets[:, None]
    target_logit = tl.sum(tl.where(is_target, logits, 0.0), axis=1)
    has_target = (targets >= pid_v * BLOCK_V) & (targets < pid_v * BLOCK_V + BLOCK_V)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_ok & has_target)


@triton.jit
def _grad_logits_kernel(hidden_ptr, weight_ptr, targets_ptr, max_ptr, norm_ptr, grad_ptr, out_ptr,
                        N, V_CHUNK, H, v_offset, stride_h, stride_w, stride_out,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_N: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, pid_v = _tile_ids(N, V_CHUNK, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = local_cols < V_CHUNK
    cols = v_offset + local_cols
    logits = _tile_logits(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                          BLOCK_N, BLOCK_V, BLOCK_K, CAST_F32, PRECISION)
    row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    log_norm = tl.load(norm_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    prob = tl.exp((logits - row_max[:, None]) - log_norm[:, None])
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    # Masked rows carry g == 0; the where keeps them exactly 0 even if their lse were garbage.
    grad = tl.where((g != 0.0)[:, None], g[:, None] * (onehot - prob), 0.0)
    out_ptrs = out_ptr + rows[:, None] * stride_out + local_cols[None, :]
    tl.store(out_ptrs, grad.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch_config(dtype: torch.dtype, interpreted: bool) -> dict:
    """Block sizes by a fixed heuristic (multi-config autotune fails on CPU)."""
    if interpreted:
        return dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, GROUP_N=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # ieee fp32 dot: smaller tiles fit the register file
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, GROUP_N=8, num_warps=4, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3)


# Elements of one backward grad_logits chunk [N, V_chunk] (256 MiB in bf16) ...
_GRAD_CHUNK_ELEMENTS = 1 << 27
# ... and never more than this fraction of the vocabulary, so small-N calls still stay far below naive.
_GRAD_CHUNK_VOCAB_DIVISOR = 8


def _grad_chunk_cols(num_tokens: int, vocab: int, block_v: int) -> int:
    cols = min(_GRAD_CHUNK_ELEMENTS // max(num_tokens, 1), triton.cdiv(vocab, _GRAD_CHUNK_VOCAB_DIVISOR))
    return max(block_v, triton.cdiv(cols, block_v) * block_v)


def _kernel_flags(dtype: torch.dtype) -> tuple[bool, str]:
    interpreted = is_interpreted(_lse_fwd_kernel)
    cast_f32 = interpreted or dtype == torch.float32
    return cast_f32, ("ieee" if cast_f32 else "tf32")


class TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, valid):
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        num_tokens, dim = hidden.shape
        vocab = weight.shape[0]
        cfg = _launch_config(hidden.dtype, is_interpreted(_lse_fwd_kernel))
        cast_f32, precision = _kernel_flags(hidden.dtype)
        tiles_v = triton.cdiv(vocab, cfg["BLOCK_V"])
        part_max = torch.empty(tiles_v, num_tokens, dtype=torch.float32, device=hidden.device)
        part_sum = torch.empty_like(part_max)
        target_logit = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        grid = (triton.cdiv(num_tokens, cfg["BLOCK_N"]) * tiles_v,)
        _lse_fwd_kernel[grid](hidden, weight, targets, part_max, part_sum, target_logit,
                              num_tokens, vocab, dim, hidden.stride(0), weight.stride(0),
                              CAST_F32=cast_f32, PRECISION=precision, **cfg)
        # Kept as (row max, log normalizer) rather than one lse: at |logit| ~ 1e4 an fp32 lse is off by
        # ~5e-4, which exp(logit - lse) would turn into a 5e-4 relative error of every softmax term.
        row_max = part_max.max(dim=0).values
        log_norm = (part_sum * torch.exp(part_max - row_max)).sum(dim=0).log()
        logp = torch.where(valid, (target_logit - row_max) - log_norm, 0.0)
        ctx.save_for_backward(hidden, weight, targets, valid, row_max, log_norm)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, valid, row_max, log_norm = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens, dim = hidden.shape
        vocab = weight.shape[0]
        cfg = _launch_config(hidden.dtype, is_interpreted(_lse_fwd_kernel))
        cast_f32, precision = _kernel_flags(hidden.dtype)
        grad_rows = torch.where(valid, grad_logp.float(), 0.0).contiguous()
        chunk = _grad_chunk_cols(num_tokens, vocab, cfg["BLOCK_V"])
        grad_logits = torch.empty(num_tokens, min(chunk, vocab), dtype=hidden.dtype, device=hidden.device)
        # fp32 accumulator: each chunk's product is rounded to the input dtype once, then summed exactly-ish.
        grad_hidden = torch.zeros(num_tokens, dim, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        for v0 in range(0, vocab, chunk):
            width = min(chunk, vocab - v0)
            block = grad_logits[:, :width]
            grid = (triton.cdiv(num_tokens, cfg["BLOCK_N"]) * triton.cdiv(width, cfg["BLOCK_V"]),)
            _grad_logits_kernel[grid](hidden, weight, targets, row_max, log_norm, grad_rows, block,
                                      num_tokens, width, dim, v0, hidden.stride(0), weight.stride(0),
                                      block.stride(0), CAST_F32=cast_f32, PRECISION=precision, **cfg)
            if need_weight:
                torch.mm(block.T, hidden, out=grad_weight[v0:v0 + width])
            if need_hidden:
                grad_hidden += block @ weight[v0:v0 + width]
        return (grad_hidden.to(hidden.dtype) if need_hidden else None, grad_weight, None, None)


def _check_inputs(hidden, weight, targets, mask):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{_WHERE}: expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{_WHERE}: targets must be an integer [N={hidden.shape[0]}] tensor, got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"{_WHERE}: mask must be [N={hidden.shape[0]}], got {tuple(mask.shape)}")


def prepare_targets(targets, vocab, mask=None, ignore_index=-100):
    """(safe targets in [0, V), valid bool mask); raises on an unmasked id outside the vocabulary."""
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"{_WHERE}: target id {int(targets[pos])} at position {pos} is outside the vocabulary "
                         f"[0, {vocab}) (mask it or use ignore_index)")
    return torch.where(valid, targets, 0).to(torch.int64).contiguous(), valid


def linear_logprobs_prepared(hidden, weight, targets, valid, impl: str):
    """Dispatch on already-checked inputs (targets in range, valid bool)."""
    if impl == "triton":
        return TritonLinearLogprobs.apply(hidden, weight, targets, valid)
    return linear_logprobs_torch(hidden, weight, targets, valid)


def linear_logprobs(hidden, weight, targets, *, mask=None, ignore_index=-100, impl="auto"):
    """Per-token log p(target | hidden) under logits = hidden @ weight.T, fp32 [N] (fp64 for fp64 inputs).

    Masked or ignore_index positions give exactly 0 and receive zero gradient. Differentiable w.r.t.
    hidden and weight; never materializes the [N, V] logits.
    """
    _check_inputs(hidden, weight, targets, mask)
    impl = resolve_impl(impl, hidden.device, _lse_fwd_kernel, _WHERE)
    check_lm_head_inputs(hidden, weight, impl, _WHERE)
    safe_targets, valid = prepare_targets(targets, weight.shape[0], mask, ignore_index)
    num_valid = int(valid.sum())
    if 0 < num_valid < valid.numel():
        # Prompt and padding tokens are often half the batch: run the op on the valid rows only.
        index = valid.nonzero().squeeze(1)
        packed = linear_logprobs_prepared(hidden[index], weight, safe_targets[index],
                                          valid[index], impl)
        return packed.new_zeros(valid.numel()).index_copy(0, index, packed)
    return linear_logprobs_prepared(hidden, weight, safe_targets, valid, impl)
