"""Fused GPU kernels (Triton) with plain-torch twins for the log-prob and training-objective path."""
from kernels.linear_logprobs import linear_logprobs
from kernels.sequence_logprobs import SequenceLogprobs, sequence_logprobs
from kernels.sequence_objective import Objective, SequenceObjective, sequence_objective

__all__ = ["Objective", "SequenceLogprobs", "SequenceObjective", "linear_logprobs", "sequence_logprobs",
           "sequence_objective"]
