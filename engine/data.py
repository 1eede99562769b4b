"""Training examples and their batches: SFT examples, preference pairs, length-grouped order, collation.

Batches are right-padded. With causal attention a real token never sees a later position, so right
padding cannot change any real token's output: no attention mask is needed, and the model keeps the
fast causal (flash) attention path. Padding positions are excluded from every loss by the target mask.
The order of examples is a pure function of (seed, epoch), so a resumed run replays it from the step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE = -100


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]  # the loss covers these tokens only


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None  # reference-model log p(chosen | prompt), summed over tokens
    ref_rejected: float | None = None

    def with_reference(self, ref_chosen: float, ref_rejected: float) -> "PreferencePair":
        return replace(self, ref_chosen=float(ref_chosen), ref_rejected=float(ref_rejected))


def example_length(example) -> int:
    if isinstance(example, SFTExample):
        return len(example.prompt_ids) + len(example.response_ids)
    return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))


def fit_prompt_side(example, max_len: int):
    """-> (example, was_cut): an example longer than max_len loses prompt tokens from the left (its
    first token, BOS, stays), so the response, e.g. an EFT judgment's closing "Score: n", is kept whole.
    A response that alone exceeds max_len keeps one prompt token and is cut on the right by the collator."""
    over = example_length(example) - max_len
    if over <= 0:
        return example, False
    p = example.prompt_ids
    keep = max(1, len(p) - over)
    return replace(example, prompt_ids=p[:1] + (p[len(p) - keep + 1:] if keep > 1 else [])), True


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int,
                  length_grouped: bool = True, group_factor: int = 32) -> list[list[int]]:
    """Indices of each global batch of this epoch (the last partial batch is dropped).

    Length grouping sorts windows of group_factor batches by length, so a batch holds similar lengths
    (little padding), then shuffles the batch order so long and short batches interleave."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if length_grouped:
        window = global_batch * group_factor
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda j: -lengths[j])]
    batches = [order[s:s + global_batch] for s in range(0, len(order) - global_batch + 1, global_batch)]
    if length_grouped:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def rank_micro_batches(batch: list[int], micro_batch: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch, in accumulation order.

    Micro-batch j goes to rank j % world_size: the set of micro-batches (and so the gradient) does not
    depend on the world size, which is what makes a 2-rank run equal a 1-process run."""
    micro = [batch[s:s + micro_batch] for s in range(0, len(batch), micro_batch)]
    return micro[rank::world_size]


def _pad_len(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _rows(sequences: list[tuple[list[int], int]], max_len: int, pad_multiple: int, pad_id: int, device):
    """[(ids, n_prompt)] -> input_ids [B, T], targets [B, T] (next token), mask [B, T] (target is a
    response token). Sequences longer than max_len are cut on the right."""
    cut = [(ids[:max_len], n_prompt) for ids, n_prompt in sequences]
    T = _pad_len(max(len(ids) for ids, _ in cut), pad_multiple)
    B = len(cut)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(cut):
        n = len(ids)
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[b, :n] = row
        targets[b, : n - 1] = row[1:]
        # position t predicts token t+1; it counts when token t+1 belongs to the response
        mask[b, max(n_prompt - 1, 0): n - 1] = True
    return {"input_ids": input_ids.to(device, non_blocking=True), "targets": targets.to(device, non_blocking=True),
            "mask": mask.to(device, non_blocking=True), "num_tokens": int(mask.sum()),
            "real_tokens": sum(len(ids) for ids, _ in cut), "padded_tokens": B * T}


def collate_sft(examples: list[SFTExample], *, max_len: int, pad_multiple: int = 1, pad_id: int = 0,
                device="cpu") -> dict:
    return _rows([(e.prompt_ids + e.response_ids, len(e.prompt_ids)) for e in examples],
                 max_len, pad_multiple, pad_id, device)


def collate_pairs(pairs: list[PreferencePair], *, max_len: int, pad_multiple: int = 1, pad_id: int = 0,
                  device="cpu", with_reference: bool = True) -> dict:
    """Chosen rows first, then rejected rows: one forward over [2B, T] serves both."""
    seqs = [(p.prompt_ids + p.chosen_ids, len(p.prompt_ids)) for p in pairs]
    seqs += [(p.prompt_ids + p.rejected_ids, len(p.prompt_ids)) for p in pairs]
    batch = _rows(seqs, max_len, pad_multiple, pad_id, device)
    batch["num_pairs"] = len(pairs)
    if with_reference:
        missing = [p.id for p in pairs if p.ref_chosen is None or p.ref_rejected is None]
        if missing:
            raise ValueError(f"preference pair {missing[0]!r} has no reference log-probs "
                             "(run compute_reference_logprobs first)")
        ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32)
        batch["ref_logps"] = ref.to(device, non_blocking=True)
    return batch
