"""Fused GPU kernels (Triton) with plain-torch twins for the DPO log-prob and loss path."""
from kernels.dpo_loss import LOSS_TYPES, dpo_loss
from kernels.linear_logprobs import linear_logprobs
from kernels.sequence_logprobs import SequenceLogprobs, sequence_logprobs
from kernels.sequence_objective import Objective, SequenceObjective, sequence_objective

__all__ = ["LOSS_TYPES", "Objective", "SequenceLogprobs", "SequenceObjective", "dpo_loss", "linear_logprobs",
           "sequence_logprobs", "sequence_objective"]
