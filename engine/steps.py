"""The trained module and the SFT / DPO objectives computed from its sequence log-probs.

PolicyLoss wraps the Llama so that the fused log-prob op runs inside a module forward: under ZeRO-3
the lm_head is registered as that module's external parameter (engine/zero3.py), so the op always
receives the gathered [V, H] weight, in forward and in backward. No [tokens, V] logits exist.

Objectives are each micro-batch's share of the global-batch objective, so the sum over micro-batches
and ranks is exactly the global-batch loss, whatever the world size and accumulation: SFT is the
mean NLL over all response tokens of the global batch; DPO the mean over its pairs.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from model.llama import Llama

from .config import TrainConfig
from .zero3 import register_output_weight

SFT_STATS = ("loss",)
DPO_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll")


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


def sft_objective(logp_sum: torch.Tensor, global_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective share, stats [loss share]) for one micro-batch; global_tokens counts all ranks."""
    objective = -logp_sum.sum() / max(global_tokens, 1)
    return objective, objective.detach().reshape(1)


def sft_chunk_objective(global_tokens: int) -> kernels.Objective:
    """sft_objective as the fused op's per-chunk callable (every sequence is its own group)."""
    return lambda logp_sum, count, rows: -logp_sum.sum() / max(global_tokens, 1)


def dpo_chunk_objective(ref_logps: torch.Tensor, num_pairs: int, global_pairs: int, cfg: TrainConfig,
                        impl: str) -> tuple[kernels.Objective, list[list[int]]]:
    """dpo_objective as the fused op's per-chunk callable and its groups (pair i = rows i and i + B)."""
    def objective(logp_sum, count, rows):
        chosen, rejected = logp_sum[0::2], logp_sum[1::2]
        ref = ref_logps.to(logp_sum.device, logp_sum.dtype)
        loss, _ = kernels.dpo_loss(chosen, rejected, ref[rows[0::2]], ref[rows[1::2]], beta=cfg.beta,
                                   loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, impl=impl)
        value = loss * (chosen.numel() / global_pairs)  # dpo_loss is the mean over this chunk's pairs
        if cfg.nll_weight:
            value = value - cfg.nll_weight * (chosen / count[0::2].clamp(min=1)).sum() / global_pairs
        return value

    return objective, [[i, i + num_pairs] for i in range(num_pairs)]


def dpo_objective(logp_sum: torch.Tensor, count: torch.Tensor, ref_logps: torch.Tensor, num_pairs: int,
                  global_pairs: int, cfg: TrainConfig, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0, B) are chosen, [B, 2B) rejected; ref_logps likewise. Returns (objective share, stats)."""
    chosen, rejected = logp_sum[:num_pairs], logp_sum[num_pairs:]
    loss, metrics = kernels.dpo_loss(chosen, rejected, ref_logps[:num_pairs], ref_logps[num_pairs:],
                                     beta=cfg.beta, loss_type=cfg.loss_type,
                                     label_smoothing=cfg.label_smoothing, impl=impl)
    share = num_pairs / global_pairs
    # RPO: the NLL of the chosen response, per token, averaged over pairs.
    nll = -(chosen / count[:num_pairs].clamp(min=1)).mean()
    objective = loss * share
    if cfg.nll_weight:
        objective = objective + cfg.nll_weight * nll * share
    extra = torch.tensor([metrics[k] for k in DPO_STATS[1:5]], dtype=torch.float32) * share
    stats = torch.cat([objective.detach().float().reshape(1).cpu(), extra, (nll.detach() * share).reshape(1).cpu()])
    return objective, stats
