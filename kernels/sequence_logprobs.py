"""Per-sequence sums of target log-probs (what DPO compares), for padded [B, T] and packed batches.

The per-token work is `linear_logprobs` (fused, chunked); the per-sequence reduction is a tiny
differentiable scatter-add over tokens, so autograd flows through it without a second custom Function.
Targets are the already-shifted next tokens: targets[b, t] is the token predicted from hidden[b, t].
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.linear_logprobs import linear_logprobs

_WHERE = "kernels/sequence_logprobs.py"


class SequenceLogprobs(NamedTuple):
    sum: torch.Tensor  # [B] fp32, sum of log p(target) over the sequence's unmasked tokens
    mean: torch.Tensor  # [B] fp32, sum / count (0 for a sequence with no tokens)
    count: torch.Tensor  # [B] fp32, number of unmasked tokens


def sequence_logprobs(hidden, weight, targets, mask=None, *, seq_ids=None, num_seqs=None,
                      ignore_index=-100, impl="auto") -> SequenceLogprobs:
    """Padded: hidden [B, T, H], targets/mask [B, T]. Packed: hidden [N, H], targets [N], seq_ids [N]
    (-1 = ignore) and num_seqs; mask [N] optional. Positions whose target is ignore_index never count."""
    if seq_ids is None:
        if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
            raise ValueError(f"{_WHERE}: padded mode needs hidden [B, T, H] and targets [B, T], got "
                             f"{tuple(hidden.shape)} and {tuple(targets.shape)} (pass seq_ids for packed)")
        batch, length, dim = hidden.shape
        if mask is not None and mask.shape != targets.shape:
            raise ValueError(f"{_WHERE}: mask must be [B, T]={tuple(targets.shape)}, got {tuple(mask.shape)}")
        seq_ids = torch.arange(batch, device=hidden.device).repeat_interleave(length)
        num_seqs = batch
        hidden = hidden.reshape(batch * length, dim)
        targets = targets.reshape(-1)
        mask = None if mask is None else mask.reshape(-1)
    else:
        if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or seq_ids.shape != targets.shape:
            raise ValueError(f"{_WHERE}: packed mode needs hidden [N, H], targets [N] and seq_ids [N], got "
                             f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(seq_ids.shape)}")
        if num_seqs is None:
            raise ValueError(f"{_WHERE}: packed mode needs num_seqs")
        if seq_ids.numel() and int(seq_ids.max()) >= num_seqs:
            raise ValueError(f"{_WHERE}: seq_ids reach {int(seq_ids.max())} but num_seqs={num_seqs}")
    in_seq = seq_ids >= 0
    mask = in_seq if mask is None else (mask.to(torch.bool) & in_seq)
    valid = mask & (targets != ignore_index)
    token_logp = linear_logprobs(hidden, weight, targets, mask=mask, ignore_index=ignore_index, impl=impl)
    index = seq_ids.clamp(min=0)
    total = token_logp.new_zeros(num_seqs).index_add(0, index, token_logp)
    count = token_logp.new_zeros(num_seqs).index_add(0, index, valid.to(token_logp.dtype))
    return SequenceLogprobs(total, total / count.clamp(min=1), count)
