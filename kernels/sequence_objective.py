"""Fused lm_head + per-sequence training objective: value and gradients from ONE pass over the logits.

SFT and DPO objectives are sums over independent groups of sequences (a DPO pair; an SFT sequence) of a
function of each group's sequence log-prob sums. For a chunk of whole groups the logits are computed
once, reduced to per-token log-probs, summed per sequence; the objective and its gradient w.r.t. each
sequence sum come from autograd on those few scalars; then the SAME logits block is turned in place into
d(objective)/d(logits) and multiplied out into d(hidden) and d(weight). Three matmuls, as naive autograd
does, against four for linear_logprobs + autograd (whose backward must recompute the logits because the
upstream gradient is unknown during its forward). Forward returns the objective and keeps the two
gradients; backward only scales them (Liger's fused-loss pattern, extended to per-sequence objectives).
A group whose tokens exceed the block budget is done in two passes (its logits recomputed once).

Triton row kernels first (GPU: logits come from cuBLAS in the input dtype, the row passes are fused
here), then their plain-torch twins (CPU default: fp32, in place), then the autograd.Function and the
public `sequence_objective`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from kernels.impl import check_lm_head_inputs, is_interpreted, resolve_impl
from kernels.linear_logprobs import prepare_targets

_WHERE = "kernels/sequence_objective.py"

# objective(logp_sum [k], count [k], rows [k]) -> scalar: one chunk's share of the objective, for the rows
# of the whole groups it holds, in group order. Must be a sum over those groups (chunks are independent).
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@triton.jit
def _row_stats_kernel(x_ptr, stride, targets_ptr, max_ptr, log_sum_ptr, target_ptr, V, BLOCK_V: tl.constexpr):
    """Per row of logits: max, log(sum(exp(x - max))), and the target's logit; x is left untouched."""
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=(v0 + cols) < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        # A lane that has seen only padding keeps max -inf; shifting it by 0 instead keeps (-inf) - (-inf)
        # = NaN out of the arithmetic (its sum stays exp(-inf) = 0).
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(x - shift)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(tl.where(run_max > float("-inf"), run_sum * tl.exp(run_max - row_max), 0.0), axis=0)
    target = tl.load(targets_ptr + row)
    tl.store(max_ptr + row, row_max)
    tl.store(log_sum_ptr + row, tl.log(total))
    tl.store(target_ptr + row, tl.load(base + target).to(tl.float32))


@triton.jit
def _row_grad_kernel(x_ptr, stride, targets_ptr, max_ptr, log_sum_ptr, grad_ptr, V, BLOCK_V: tl.constexpr):
    """In place: x <- g * (onehot(target) - softmax(x)), rounded once to x's dtype."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V
    ptrs = x_ptr + row.to(tl.int64) * stride + cols
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    prob = tl.exp((x - tl.load(max_ptr + row)) - tl.load(log_sum_ptr + row))
    onehot = tl.where(cols == tl.load(targets_ptr + row), 1.0, 0.0)
    tl.store(ptrs, (tl.load(grad_ptr + row) * (onehot - prob)).to(x_ptr.dtype.element_ty), mask=ok)


def _block_v(interpreted: bool) -> int:
    return 64 if interpreted else 2048


def _stats_triton(block, targets):
    rows, vocab = block.shape
    row_max = torch.empty(rows, dtype=torch.float32, device=block.device)
    log_sum, target_logit = torch.empty_like(row_max), torch.empty_like(row_max)
    if rows:
        _row_stats_kernel[(rows,)](block, block.stride(0), targets, row_max, log_sum, target_logit, vocab,
                                   BLOCK_V=_block_v(is_interpreted(_row_stats_kernel)), num_warps=8)
    return row_max, log_sum, target_logit


def _grad_triton(block, targets, row_max, log_sum, grad):
    rows, vocab = block.shape
    bv = _block_v(is_interpreted(_row_grad_kernel))
    if rows:
        _row_grad_kernel[(rows, triton.cdiv(vocab, bv))](block, block.stride(0), targets, row_max, log_sum,
                                                          grad.float().contiguous(), vocab, BLOCK_V=bv,
                                                          num_warps=8)
    return block


def _stats_torch(block, targets):
    """Same outputs as the kernel; leaves block = exp(x - max) (in place: no second [rows, V] buffer)."""
    row_max = block.amax(dim=1, keepdim=True)
    target_logit = block.gather(1, targets[:, None]).squeeze(1)
    log_sum = block.sub_(row_max).exp_().sum(dim=1).log_()
    return row_max.squeeze(1), log_sum, target_logit


def _grad_torch(block, targets, row_max, log_sum, grad, shifted_exp: bool):
    """In place: block <- g * (onehot - softmax). `shifted_exp`: block already holds exp(x - max)."""
    if not shifted_exp:
        block.sub_(row_max[:, None]).exp_()
    block.mul_(torch.exp(-log_sum)[:, None]).neg_()
    block[torch.arange(block.shape[0], device=block.device), targets] += 1
    return block.mul_(grad[:, None].to(block.dtype))


class _Plan(NamedTuple):
    """Token rows of each chunk of whole groups, in the flattened [B * T] layout."""
    rows: torch.Tensor  # [k] sequence rows of the chunk, group order
    tokens: torch.Tensor  # [R] flat token indices (valid targets only)
    token_row: torch.Tensor  # [R] position in `rows` of each token's sequence


def _plan(valid: torch.Tensor, groups: Sequence[Sequence[int]], budget_rows: int) -> list[_Plan]:
    batch, length = valid.shape
    counts = valid.sum(dim=1).tolist()
    positions = [valid[b].nonzero().squeeze(1) + b * length for b in range(batch)]
    chunks, current, size = [], [], 0
    for group in groups:
        tokens = sum(counts[r] for r in group)
        if current and size + tokens > budget_rows:
            chunks.append(current)
            current, size = [], 0
        current.append(group)
        size += tokens
    if current:
        chunks.append(current)
    device = valid.device
    plans = []
    for chunk in chunks:
        rows = [r for group in chunk for r in group]
        plans.append(_Plan(
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.cat([positions[r] for r in rows]) if rows else torch.zeros(0, dtype=torch.long, device=device),
            torch.cat([torch.full((counts[r],), i, dtype=torch.long, device=device) for i, r in enumerate(rows)]),
        ))
    return plans


class FusedSequenceObjective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, objective, groups, impl, budget_rows):
        # The dtypes below are chosen on purpose (fp32 blocks on CPU, input-dtype cuBLAS on GPU): an outer
        # autocast region must not re-cast the matmuls.
        with torch.autocast(hidden.device.type, enabled=False):
            return FusedSequenceObjective._forward(ctx, hidden, weight, targets, valid, objective, groups, impl,
                                                   budget_rows)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, valid, objective, groups, impl, budget_rows):
        batch, length, dim = hidden.shape
        device = hidden.device
        flat_hidden = hidden.reshape(batch * length, dim)
        flat_targets = targets.reshape(-1)
        # torch (CPU default): fp32 logits and matmuls, W upcast once per call. triton (GPU): cuBLAS
        # matmuls in the input dtype as naive autograd runs them, fp32 only inside the row kernels.
        cdtype = torch.float64 if hidden.dtype == torch.float64 else (
            hidden.dtype if impl == "triton" else torch.float32)
        acc = torch.float64 if cdtype == torch.float64 else torch.float32  # sums and accumulators
        weight_c = weight.to(cdtype)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(batch * length, dim, dtype=cdtype, device=device) if need_hidden else None
        # One chunk (the usual DPO micro-batch) writes d(weight) straight from one matmul; several chunks
        # accumulate in fp32 so the sum is not re-rounded to bf16 per chunk.
        grad_weight = None
        logp_sum = torch.zeros(batch, dtype=acc, device=device)
        count = valid.sum(dim=1).to(acc)
        value = torch.zeros((), dtype=acc, device=device)
        plans = _plan(valid, groups, budget_rows)
        block_rows = max(1, min(budget_rows, max((p.tokens.numel() for p in plans), default=1)))
        buffer = torch.empty(block_rows, weight.shape[0], dtype=cdtype, device=device)
        for plan in plans:
            num = plan.tokens.numel()
            spans = [(s, min(s + block_rows, num)) for s in range(0, num, block_rows)] or [(0, 0)]
            one_pass = len(spans) == 1
            stats, token_logp = [], torch.zeros(num, dtype=acc, device=device)
            for start, end in spans:  # pass 1: per-token log-probs (the block survives only if one_pass)
                block = _logits(flat_hidden, weight_c, plan.tokens[start:end], buffer, cdtype)
                t = flat_targets[plan.tokens[start:end]]
                row_max, log_sum, target_logit = (_stats_triton(block, t) if impl == "triton"
                                                  else _stats_torch(block, t))
                token_logp[start:end] = (target_logit - row_max) - log_sum
                stats.append((row_max, log_sum))
            seq_logp = torch.zeros(plan.rows.numel(), dtype=acc, device=device)
            seq_logp.index_add_(0, plan.token_row, token_logp)
            logp_sum[plan.rows] = seq_logp
            with torch.enable_grad():
                leaf = seq_logp.detach().requires_grad_(True)
                chunk_value = objective(leaf, count[plan.rows], plan.rows)
                seq_grad = (torch.autograd.grad(chunk_value, leaf, allow_unused=True)[0]
                            if chunk_value.requires_grad else None)
            value = value + chunk_value.detach().to(acc)
            if seq_grad is None or not (need_hidden or need_weight):
                continue
            token_grad = seq_grad[plan.token_row]
            for (start, end), (row_max, log_sum) in zip(spans, stats):  # pass 2: the gradients
                index = plan.tokens[start:end]
                t = flat_targets[index]
                if one_pass:  # the block from pass 1 is still in the buffer
                    block = buffer[: end - start]
                else:
                    block = _logits(flat_hidden, weight_c, index, buffer, cdtype)
                g = token_grad[start:end]
                if impl == "triton":
                    _grad_triton(block, t, row_max, log_sum, g)
                else:
                    _grad_torch(block, t, row_max, log_sum, g, shifted_exp=one_pass)
                h = flat_hidden[index].to(cdtype)
                if need_hidden:
                    grad_hidden[index] = block @ weight_c
                if need_weight:
                    if grad_weight is None and len(plans) == 1 and one_pass:
                        grad_weight = block.T @ h
                    else:
                        if grad_weight is None:
                            grad_weight = torch.zeros(weight.shape, dtype=acc, device=device)
                        if grad_weight.dtype == cdtype:
                            grad_weight.addmm_(block.T, h)
                        else:
                            grad_weight.add_(block.T @ h)
        if need_weight and grad_weight is None:
            grad_weight = torch.zeros_like(weight)
        # Kept on ctx, not saved_tensors: backward scales them in place and hands them over, so no second
        # [V, H] copy exists at the peak (the loss scale, e.g. 1 / accumulation steps, is rarely 1).
        ctx.grads = [grad_hidden.to(hidden.dtype).reshape(hidden.shape) if need_hidden else None,
                     grad_weight.to(weight.dtype) if need_weight else None]
        ctx.mark_non_differentiable(logp_sum, count)
        return value, logp_sum, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, _grad_sum, _grad_count):
        if ctx.grads is None:
            raise RuntimeError(f"{_WHERE}: backward ran twice; the fused gradients are handed over once "
                               "(retain_graph is not supported)")
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_value.to(g.dtype)) for g in grads]
        return (*scaled, None, None, None, None, None, None)


def _logits(flat_hidden, weight_c, index, buffer, cdtype):
    block = buffer[: index.numel()]
    return torch.mm(flat_hidden[index].to(cdtype), weight_c.T, out=block)


class SequenceObjective(NamedTuple):
    value: torch.Tensor  # scalar, differentiable w.r.t. hidden and weight
    sum: torch.Tensor  # [B] fp32 sequence log-prob sums (no gradient: the objective carries it)
    count: torch.Tensor  # [B] fp32 target tokens per sequence


# Logits rows per block: torch keeps fp32 blocks near linear_logprobs_ref's 32 MiB; a GPU bf16 block of
# 2^28 elements is 512 MiB (8192 rows at V = 32000, 2093 at V = 128256).
_BLOCK_ELEMENTS = {"torch": 1 << 23, "triton": 1 << 28}


def sequence_objective(hidden, weight, targets, mask, objective: Objective,
                       groups: Sequence[Sequence[int]] | None = None, *, ignore_index: int = -100,
                       impl: str = "auto", block_elements: int | None = None) -> SequenceObjective:
    """Padded hidden [B, T, H], targets/mask [B, T] (targets already shifted); groups: row lists whose
    objective terms depend on each other (default: every row alone). The objective is called once per
    chunk of whole groups with (logp_sum, count, rows) of those rows and must return their scalar share."""
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2] or weight.dim() != 2 \
            or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{_WHERE}: expected hidden [B, T, H], targets [B, T], weight [V, H]; got "
                         f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(weight.shape)}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"{_WHERE}: mask must be [B, T]={tuple(targets.shape)}, got {tuple(mask.shape)}")
    batch = hidden.shape[0]
    groups = [[b] for b in range(batch)] if groups is None else [list(g) for g in groups]
    seen = sorted(r for g in groups for r in g)
    if seen != list(range(batch)):
        raise ValueError(f"{_WHERE}: groups must cover rows 0..{batch - 1} exactly once, got {groups}")
    impl = resolve_impl(impl, hidden.device, _row_stats_kernel, _WHERE)
    check_lm_head_inputs(hidden, weight, impl, _WHERE)
    vocab = weight.shape[0]
    flat_mask = None if mask is None else mask.reshape(-1)
    safe, valid = prepare_targets(targets.reshape(-1), vocab, flat_mask, ignore_index)
    budget = max(1, (block_elements or _BLOCK_ELEMENTS[impl]) // vocab)
    return SequenceObjective(*FusedSequenceObjective.apply(
        hidden, weight, safe.reshape(targets.shape), valid.reshape(targets.shape), objective, groups, impl, budget))
