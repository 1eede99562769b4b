"""The trained module: the Llama plus its fused lm_head op, so that one module forward gives the loss.

PolicyLoss wraps the Llama so that the fused log-prob op runs inside a module forward: under ZeRO-3
the lm_head is registered as that module's external parameter (engine/zero3.py), so the op always
receives the gathered [V, H] weight, in forward and in backward. No [tokens, V] logits exist. The
objectives it is handed live in engine/objectives.py.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from model.llama import Llama

from .zero3 import register_output_weight


class PolicyLoss(nn.Module):
    """forward(input_ids, targets, mask) -> (sum of target log-probs [B], count of target tokens [B]);
    forward(..., objective, groups) -> (objective value, sums [B], counts [B]) through the fused op
    (kernels/sequence_objective.py: logits once, gradients computed in forward)."""

    def __init__(self, model: Llama, kernel_impl: str = "auto", autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.kernel_impl = kernel_impl
        self.autocast_dtype = autocast_dtype  # set when fp32 master weights run under autocast
        register_output_weight(self, model)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                objective: kernels.Objective | None = None, groups: list[list[int]] | None = None):
        # Right-padded batches need no attention mask (see engine/data.py), keeping the causal fast path.
        hidden = self.model(input_ids, return_hidden=True)
        weight = self.model.output_weight
        if self.autocast_dtype is not None:
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        if objective is not None:
            fused = kernels.sequence_objective(hidden, weight, targets, mask, objective, groups, impl=self.kernel_impl)
            return fused.value, fused.sum, fused.count
        out = kernels.sequence_logprobs(hidden, weight, targets, mask, impl=self.kernel_impl)
        return out.sum, out.count
