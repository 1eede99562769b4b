"""Plain-torch, token-chunked linear_logprobs: the CPU default path and the twin of the Triton kernels.

Only one [chunk, V] block of logits exists at a time, reused across chunks and reduced in place. Forward
saves its inputs plus two [N] vectors (row max, log of the shifted sum); backward recomputes each block from hidden/weight
instead of storing anything [N, V]-sized.
"""
from __future__ import annotations

import torch

# One [chunk, V] fp32 logits block holds at most this many elements (32 MiB; 262 rows at V = 32000).
# Measured fwd+bwd on 2 CPU threads, fp32, against naive (bench/dpo_logprobs.py): (1024, 256, 32000) 1.20x
# time at 0.185x peak; (2048, 512, 32000) 1.29x at 0.143x. 128-row chunks cost ~15% more time for ~3% less
# peak (the fp32 weight gradient, which naive also holds, is then most of what is left).
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
        num_tokens, device = hidden.shape[0], hidden.device
        cdtype = compute_dtype(hidden.dtype)
        # One upcast of W per call (not per chunk): bf16 matmuls on CPU are slow and lossy.
        weight_c = weight.to(cdtype)
        logp = torch.zeros(num_tokens, dtype=cdtype, device=device)
        # The softmax shift is kept as (row max, log of the shifted sum), not as their sum: at |logit| ~ 1e4
        # an fp32 logsumexp has lost ~1e-3 absolutely, which the backward's exp(logit - shift) would inherit.
        row_max = torch.empty(num_tokens, dtype=cdtype, device=device)
        log_sum = torch.empty(num_tokens, dtype=cdtype, device=device)
        # Every chunk's logits are written into this one buffer and reduced in place: a second [chunk, V]
        # temporary (log_softmax's output, softmax's output) was most of this path's peak memory.
        block = torch.empty(min(chunk_rows, num_tokens), weight.shape[0], dtype=cdtype, device=device)
        for start in range(0, num_tokens, chunk_rows):
            end = min(start + chunk_rows, num_tokens)
            logits = torch.mm(hidden[start:end].to(cdtype), weight_c.T, out=block[: end - start])
            chunk_max = logits.amax(dim=1, keepdim=True)
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1) - chunk_max.squeeze(1)
            chunk_log_sum = logits.sub_(chunk_max).exp_().sum(dim=1).log_()
            row_max[start:end], log_sum[start:end] = chunk_max.squeeze(1), chunk_log_sum
            logp[start:end] = torch.where(valid[start:end], target_logit - chunk_log_sum, 0.0)
        ctx.save_for_backward(hidden, weight, targets, valid, row_max, log_sum)
        ctx.chunk_rows = chunk_rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, valid, row_max, log_sum = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdtype = compute_dtype(hidden.dtype)
        num_tokens, device = hidden.shape[0], hidden.device
        grad_rows = torch.where(valid, grad_logp.to(cdtype), 0.0)
        weight_c = weight.to(cdtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=cdtype, device=device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=cdtype, device=device) if need_weight else None
        block = torch.empty(min(ctx.chunk_rows, num_tokens), weight.shape[0], dtype=cdtype, device=device)
        for start in range(0, num_tokens, ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, num_tokens)
            g = grad_rows[start:end, None]
            h = hidden[start:end].to(cdtype)
            # d logp / d logits = onehot(target) - softmax = -(softmax - onehot). The softmax is rebuilt in
            # place from the forward's saved shift (no second buffer); the per-row g goes on
            # the [chunk, H] sides of the matmuls (index_add_ of the onehot term into grad_weight is ~10x
            # slower on CPU than this).
            neg_grad = torch.mm(h, weight_c.T, out=block[: end - start])
            neg_grad.sub_(row_max[start:end, None]).sub_(log_sum[start:end, None]).exp_()
            neg_grad[torch.arange(end - start, device=device), targets[start:end]] -= 1
            if need_hidden:
                torch.mm(neg_grad, weight_c, out=grad_hidden[start:end]).mul_(-g)
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
