"""Plain-torch, token-chunked linear_logprobs: the CPU default path and the twin of the Triton kernels.

Only one [chunk, V] block of logits exists at a time. Forward saves nothing beyond its inputs; backward
recomputes each block from hidden/weight instead of storing anything [N, V]-sized.
"""
from __future__ import annotations

import torch

# One [chunk, V] fp32 logits block holds at most this many elements (32 MiB; 262 rows at V = 32000).
# Measured on 2 CPU threads at (N, H, V) = (1024, 256, 32000): 131-row chunks ran 1.9x naive's time,
# 256 rows 1.34x, 512 rows 1.16x (the skinny matmuls lose efficiency); 256 keeps the peak near 0.2x.
CHUNK_ELEMENTS = 1 << 23


def default_chunk_rows(num_tokens: int, vocab: int) -> int:
    return max(1, min(num_tokens, CHUNK_ELEMENTS // max(vocab, 1)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 so gradcheck sees an exact-enough op; everything narrower accumulates in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


class ChunkedLinearLogprobs(torch.autograd.Function):
    """logp[n] = log_softmax(h[n] @ W.T)[t[n]] for valid rows, exactly 0 elsewhere."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, chunk_rows):
        num_tokens = hidden.shape[0]
        cdtype = compute_dtype(hidden.dtype)
        # One upcast of W per call (not per chunk): bf16 matmuls on CPU are slow and lossy.
        weight_c = weight.to(cdtype)
        logp = torch.zeros(num_tokens, dtype=cdtype, device=hidden.device)
        for start in range(0, num_tokens, chunk_rows):
            end = min(start + chunk_rows, num_tokens)
            # log_softmax (one fused pass) subtracts the row max before anything is rounded, so even at
            # |logit| ~ 1e4 the result keeps fp32 precision, unlike logit - logsumexp.
            chunk_logp = torch.log_softmax(hidden[start:end].to(cdtype) @ weight_c.T, dim=-1)
            target_logp = chunk_logp.gather(1, targets[start:end, None]).squeeze(1)
            logp[start:end] = torch.where(valid[start:end], target_logp, 0.0)
        ctx.save_for_backward(hidden, weight, targets, valid)
        ctx.chunk_rows = chunk_rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, valid = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdtype = compute_dtype(hidden.dtype)
        num_tokens = hidden.shape[0]
        grad_rows = torch.where(valid, grad_logp.to(cdtype), 0.0)
        weight_c = weight.to(cdtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=cdtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_weight else None
        for start in range(0, num_tokens, ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, num_tokens)
            g = grad_rows[start:end, None]
            h = hidden[start:end].to(cdtype)
            t = targets[start:end]
            # d logp / d logits = onehot(target) - softmax = -(softmax - onehot). The per-row g goes on
            # the [chunk, H] sides of the matmuls, so the only pass over [chunk, V] is the fused softmax
            # (index_add_ of the onehot term into grad_weight is ~10x slower on CPU than this).
            neg_grad = torch.softmax(h @ weight_c.T, dim=-1)
            neg_grad[torch.arange(end - start, device=hidden.device), t] -= 1
            if need_hidden:
                grad_hidden[start:end] = (neg_grad @ weight_c).mul_(-g)
            if need_weight:
                grad_weight.addmm_(neg_grad.T, g * h, alpha=-1)
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            None,
            None,
            None,
        )


def linear_logprobs_torch(hidden, weight, targets, valid, chunk_rows: int | None = None):
    """Chunked reference on prepared inputs (targets already in range, valid a bool [N])."""
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], weight.shape[0])
    return ChunkedLinearLogprobs.apply(hidden, weight, targets, valid, rows)


def linear_logprobs_naive(hidden, weight, targets, valid, dtype=torch.float64):
    """The textbook [N, V] computation in `dtype` (float64 for the test oracle)."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return torch.where(valid, logp, 0.0)
