"""Fused GPU kernels (Triton) with plain-torch twins for the DPO log-prob and loss path."""
from kernels.dpo_loss import LOSS_TYPES, dpo_loss
from kernels.linear_logprobs import linear_logprobs
from kernels.sequence_logprobs import SequenceLogprobs, sequence_logprobs

__all__ = ["LOSS_TYPES", "SequenceLogprobs", "dpo_loss", "linear_logprobs", "sequence_logprobs"]
