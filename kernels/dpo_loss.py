"""DPO loss (sigmoid with conservative label smoothing, ipo, hinge, robust) and TRL's reward metrics.

With m = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) and z = beta * m, per pair:
  sigmoid: -(1-eps) logsigmoid(z) - eps logsigmoid(-z)
  ipo:     (m - 1/(2 beta))^2
  hinge:   relu(1 - z)
  robust:  (-(1-eps) logsigmoid(z) + eps logsigmoid(-z)) / (1 - 2 eps)
and the loss is the batch mean. The Triton kernel computes the loss and dloss/dm in one elementwise
pass (forward and backward fused: backward only scales the saved dloss/dm); the torch twin does the same
with torch ops. Both are one autograd.Function each.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.impl import resolve_impl

_WHERE = "kernels/dpo_loss.py"
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@triton.jit
def _logsigmoid(z):
    return tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))  # in (0, 1]: no overflow for any z
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _dpo_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, loss_ptr, dmargin_ptr, chosen_ptr, rejected_ptr,
                B, beta, eps, LOSS_TYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < B
    pc = tl.load(pc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    pr = tl.load(pr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    rc = tl.load(rc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    rr = tl.load(rr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    chosen = pc - rc
    rejected = pr - rr
    m = chosen - rejected
    z = beta * m
    if LOSS_TYPE == 0:
        loss = -(1.0 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z)
        dmargin = beta * (eps * _sigmoid(z) - (1.0 - eps) * _sigmoid(-z))
    elif LOSS_TYPE == 1:
        d = m - 1.0 / (2.0 * beta)
        loss = d * d
        dmargin = 2.0 * d
    elif LOSS_TYPE == 2:
        loss = tl.maximum(1.0 - z, 0.0)
        dmargin = tl.where(1.0 - z > 0.0, -beta, 0.0)
    else:
        scale = 1.0 / (1.0 - 2.0 * eps)
        loss = scale * (eps * _logsigmoid(-z) - (1.0 - eps) * _logsigmoid(z))
        dmargin = -scale * beta * ((1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z))
    tl.store(loss_ptr + offs, loss, mask=ok)
    tl.store(dmargin_ptr + offs, dmargin, mask=ok)
    tl.store(chosen_ptr + offs, beta * chosen, mask=ok)
    tl.store(rejected_ptr + offs, beta * rejected, mask=ok)


def _torch_terms(pc, pr, rc, rr, beta, loss_type, eps):
    """(per-pair loss, dloss/dmargin, beta*chosen, beta*rejected) with torch ops, same formulas as the kernel."""
    chosen, rejected = pc - rc, pr - rr
    m = chosen - rejected
    z = beta * m
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        dmargin = beta * (eps * torch.sigmoid(z) - (1 - eps) * torch.sigmoid(-z))
    elif loss_type == "ipo":
        d = m - 1 / (2 * beta)
        loss, dmargin = d * d, 2 * d
    elif loss_type == "hinge":
        loss = torch.relu(1 - z)
        dmargin = torch.where(1 - z > 0, -beta, 0.0).to(z.dtype)
    else:
        scale = 1 / (1 - 2 * eps)
        loss = scale * (eps * F.logsigmoid(-z) - (1 - eps) * F.logsigmoid(z))
        dmargin = -scale * beta * ((1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))
    return loss, dmargin, beta * chosen, beta * rejected


class DPOLoss(torch.autograd.Function):
    """Mean DPO loss; also returns the per-pair implicit rewards (non-differentiable)."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, beta, loss_type, eps, use_triton):
        cdtype = torch.float64 if pc.dtype == torch.float64 else torch.float32
        if use_triton:
            pc, pr, rc, rr = (x.contiguous() for x in (pc, pr, rc, rr))
            batch = pc.numel()
            loss, dmargin, chosen, rejected = (torch.empty(batch, dtype=torch.float32, device=pc.device)
                                               for _ in range(4))
            block = min(1024, max(16, triton.next_power_of_2(batch)))
            _dpo_kernel[(triton.cdiv(batch, block),)](pc, pr, rc, rr, loss, dmargin, chosen, rejected,
                                                      batch, float(beta), float(eps),
                                                      LOSS_TYPE=LOSS_TYPES.index(loss_type), BLOCK=block)
        else:
            loss, dmargin, chosen, rejected = _torch_terms(*(x.to(cdtype) for x in (pc, pr, rc, rr)),
                                                           beta, loss_type, eps)
        ctx.save_for_backward(dmargin)
        ctx.dtypes = tuple(x.dtype for x in (pc, pr, rc, rr))
        ctx.mark_non_differentiable(chosen, rejected)
        return loss.mean(), chosen, rejected

    @staticmethod
    def backward(ctx, grad_loss, _grad_chosen, _grad_rejected):
        (dmargin,) = ctx.saved_tensors
        g = grad_loss * dmargin / dmargin.numel()
        grads = (g, -g, -g, g)  # dm/d(pc, pr, rc, rr)
        return (*(x.to(dt) for x, dt in zip(grads, ctx.dtypes)), None, None, None, None)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0, impl="auto"):
    """-> (mean loss scalar, metrics dict of floats with TRL's names: rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies). Inputs are [B] sequence log-probs (sums or means)."""
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if any(x.dim() != 1 or x.shape != policy_chosen.shape for x in inputs) or policy_chosen.numel() == 0:
        raise ValueError(f"{_WHERE}: the four log-prob tensors must share one non-empty [B] shape, got "
                         f"{[tuple(x.shape) for x in inputs]}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{_WHERE}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"{_WHERE}: beta must be > 0, got {beta}")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0:
        raise ValueError(f"{_WHERE}: label_smoothing only applies to sigmoid and robust, got "
                         f"{label_smoothing} with loss_type={loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{_WHERE}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    use_triton = resolve_impl(impl, policy_chosen.device, _dpo_kernel, _WHERE) == "triton"
    if use_triton and policy_chosen.dtype == torch.float64:
        raise ValueError(f"{_WHERE}: impl='triton' computes in fp32; use impl='torch' for float64 inputs")
    loss, chosen, rejected = DPOLoss.apply(*inputs, float(beta), loss_type, float(label_smoothing),
                                           use_triton)
    stats = torch.stack([chosen.mean(), rejected.mean(), (chosen - rejected).mean(),
                         (chosen > rejected).float().mean()]).tolist()  # one host sync for all four
    metrics = dict(zip(("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"), stats))
    return loss, metrics
