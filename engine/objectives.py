"""The training objectives behind one interface: SFTObjective and DPOObjective.

The trainer (engine/trainer.py) runs one loop and knows no loss: per optimizer step it asks the
objective for the global batch's normaliser, per micro-batch for the collated rows, the per-chunk
callable (and groups) of the fused kernels.sequence_objective, and the logged stats. The fused op is
the only production path; `loss` is the same objective from sequence log-prob sums with autograd (DPO's
logged stats come from it; tests hold the fused path against it).

Every value is one micro-batch's share of the global-batch objective, so the sum over micro-batches
and ranks is exactly the global-batch loss, whatever the world size and accumulation: SFT is the mean
NLL over all response tokens of the global batch; DPO the mean over its pairs (+ the RPO NLL term).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

import kernels

from .config import DPOObjectiveConfig
from .data import PreferencePair, SFTExample, collate_pairs, collate_sft, example_length

SFT_STATS = ("loss",)
DPO_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll")


class Objective(Protocol):
    kind: str  # "sft" | "dpo": log lines and the checkpoint's data fingerprint
    stat_names: tuple[str, ...]  # the per-step stats, the loss first
    sequences_per_item: int  # rows one data item becomes in a batch

    def check(self, data: Sequence) -> None:
        """Raise (naming the item) for data this objective cannot train on."""

    def collate(self, items: list, **collate) -> dict:
        """The micro-batch's rows (engine/data.py's collate_* keys)."""

    def normaliser(self, items: list, max_len: int) -> int:
        """The global batch's denominator (all ranks' items of one optimizer step)."""

    def chunk(self, batch: dict, norm: int) -> tuple[kernels.Objective, list[list[int]] | None]:
        """The fused op's per-chunk objective and its groups (None: every row alone)."""

    def stats(self, batch: dict, value: torch.Tensor, logp_sum: torch.Tensor, count: torch.Tensor,
              norm: int) -> torch.Tensor:
        """[len(stat_names)] fp32 on the device: this micro-batch's share of each logged stat."""

    def loss(self, batch: dict, logp_sum: torch.Tensor, count: torch.Tensor, norm: int) -> torch.Tensor:
        """The objective share from sequence sums, differentiable through them (the unfused form)."""


def response_targets(example: SFTExample, max_len: int) -> int:
    """Response tokens that count in the loss after cutting at max_len (matches data._rows)."""
    n = min(example_length(example), max_len)
    return max(0, n - 1 - max(len(example.prompt_ids) - 1, 0))


class SFTObjective:
    """Mean NLL over the response tokens of the global batch."""
    kind, stat_names, sequences_per_item = "sft", SFT_STATS, 1

    def check(self, data: Sequence) -> None:
        _check_types(data, SFTExample, "sft")

    def collate(self, items: list, **collate) -> dict:
        return collate_sft(items, **collate)

    def normaliser(self, items: list, max_len: int) -> int:
        return sum(response_targets(x, max_len) for x in items)

    def chunk(self, batch: dict, norm: int):
        return (lambda logp_sum, count, rows: -logp_sum.sum() / max(norm, 1)), None

    def stats(self, batch, value, logp_sum, count, norm) -> torch.Tensor:
        return value.detach().float().reshape(1)  # the fused value itself: the loss as trained

    def loss(self, batch, logp_sum, count, norm) -> torch.Tensor:
        return -logp_sum.sum() / max(norm, 1)


class DPOObjective:
    """DPO (or IPO / hinge / robust; + RPO's NLL) on pairs carrying reference log-probs. Rows [0, B) of a
    batch are the chosen responses, [B, 2B) the rejected; the fused op groups pair i as rows (i, i + B)."""
    kind, stat_names, sequences_per_item = "dpo", DPO_STATS, 2

    def __init__(self, cfg: DPOObjectiveConfig | None = None):
        self.cfg = (cfg or DPOObjectiveConfig()).validate()

    def check(self, data: Sequence) -> None:
        _check_types(data, PreferencePair, "dpo")
        for item in data:
            if item.ref_chosen is None or item.ref_rejected is None:
                raise ValueError(f"preference pair {item.id!r} has no reference log-probs "
                                 "(run compute_reference_logprobs first)")

    def collate(self, items: list, **collate) -> dict:
        return collate_pairs(items, **collate)

    def normaliser(self, items: list, max_len: int) -> int:
        return len(items)

    def chunk(self, batch: dict, norm: int):
        ref_logps, num_pairs, cfg = batch["ref_logps"], batch["num_pairs"], self.cfg

        def objective(logp_sum, count, rows):  # rows come in group order: chosen, rejected, chosen, ...
            chosen, rejected = logp_sum[0::2], logp_sum[1::2]
            ref = ref_logps.to(logp_sum.device, logp_sum.dtype)
            loss, _, _ = dpo_loss(chosen, rejected, ref[rows[0::2]], ref[rows[1::2]], cfg)
            value = loss * (chosen.numel() / norm)  # dpo_loss is the mean over this chunk's pairs
            if cfg.nll_weight:
                value = value - cfg.nll_weight * (chosen / count[0::2].clamp(min=1)).sum() / norm
            return value

        return objective, [[i, i + num_pairs] for i in range(num_pairs)]

    def _terms(self, batch, logp_sum, count, norm):
        n, ref, cfg = batch["num_pairs"], batch["ref_logps"], self.cfg
        chosen = logp_sum[:n]
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, logp_sum[n:], ref[:n], ref[n:], cfg)
        share = n / norm
        nll = -(chosen / count[:n].clamp(min=1)).mean()  # RPO: per-token NLL of the chosen, mean over pairs
        objective = loss * share
        if cfg.nll_weight:
            objective = objective + cfg.nll_weight * nll * share
        return objective, share, nll, chosen_rewards, rejected_rewards

    def loss(self, batch, logp_sum, count, norm) -> torch.Tensor:
        return self._terms(batch, logp_sum, count, norm)[0]

    def stats(self, batch, value, logp_sum, count, norm) -> torch.Tensor:
        with torch.no_grad():  # from the same (detached) sequence sums the fused op returned
            objective, share, nll, chosen, rejected = self._terms(batch, logp_sum, count, norm)
            rewards = torch.stack([chosen.mean(), rejected.mean(), (chosen - rejected).mean(),
                                   (chosen > rejected).float().mean()]).float()
            return torch.cat([objective.float().reshape(1), rewards * share, (nll.float() * share).reshape(1)])


def _check_types(data: Sequence, want: type, kind: str) -> None:
    for i, item in enumerate(data):
        if not isinstance(item, want):
            raise TypeError(f"{kind} data item {i}: expected {want.__name__}, got {type(item).__name__}")


def _pair_terms(pc, pr, rc, rr, beta: float, loss_type: str, eps: float):
    """(per-pair loss, dloss/dmargin, beta*chosen, beta*rejected); m = (pc - rc) - (pr - rr), z = beta*m:
      sigmoid: -(1-eps) logsigmoid(z) - eps logsigmoid(-z)     ipo:   (m - 1/(2 beta))^2
      robust:  (-(1-eps) logsigmoid(z) + eps logsigmoid(-z)) / (1 - 2 eps)     hinge: relu(1 - z)
    """
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


class _DPOLoss(torch.autograd.Function):
    """Mean loss with the closed-form dloss/dmargin (finite for any margin, where autograd through
    logsigmoid would round differently); also the per-pair implicit rewards, non-differentiable."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, beta, loss_type, eps):
        cdtype = torch.float64 if pc.dtype == torch.float64 else torch.float32
        loss, dmargin, chosen, rejected = _pair_terms(*(x.to(cdtype) for x in (pc, pr, rc, rr)), beta, loss_type, eps)
        ctx.save_for_backward(dmargin)
        ctx.dtypes = tuple(x.dtype for x in (pc, pr, rc, rr))
        ctx.mark_non_differentiable(chosen, rejected)
        return loss.mean(), chosen, rejected

    @staticmethod
    def backward(ctx, grad_loss, _grad_chosen, _grad_rejected):
        (dmargin,) = ctx.saved_tensors
        g = grad_loss * dmargin / dmargin.numel()
        grads = (g, -g, -g, g)  # dm/d(pc, pr, rc, rr)
        return (*(x.to(dt) for x, dt in zip(grads, ctx.dtypes)), None, None, None)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, cfg: DPOObjectiveConfig):
    """-> (mean loss over the [B] pairs, beta * (policy - ref) of the chosen [B], of the rejected [B]:
    TRL's implicit rewards). Inputs are [B] sequence log-prob sums; cfg is already validated."""
    return _DPOLoss.apply(policy_chosen, policy_rejected, ref_chosen, ref_rejected, float(cfg.beta), cfg.loss_type,
                          float(cfg.label_smoothing))
