"""The "expected" judge score: the probability-weighted mean of the score token after "Score: ".

The judge writes its justification as usual (sampled, stopped at "Score:"); then the text is
teacher-forced up to "Score: " and the next-token distribution over the six score tokens 0..5,
renormalized, gives E[score]. Unlike a sampled integer it is never missing and rarely ties, so
fewer prompts are lost to "all responses scored 4". Needs every score to be one token after the
shared "Score: " prefix (true for digit-splitting tokenizers: Llama 2/3, SentencePiece worlds).
"""
from __future__ import annotations

import torch

SCORES = range(6)


def score_token_ids(tok) -> tuple[list[int], list[int]]:
    """(ids of the "Score: " prefix, [id of "0", ..., id of "5"]) as this tokenizer splits "Score: k"."""
    encoded = [tok.encode(f"Score: {k}", bos=False) for k in SCORES]
    n = len(encoded[0]) - 1
    prefix = encoded[0][:n]
    if any(len(e) != n + 1 or e[:n] != prefix for e in encoded):
        raise ValueError("judge.mode=expected: this tokenizer does not split \"Score: k\" into a shared prefix and "
                         "one score token (use judge.mode=sampled)")
    return prefix, [e[n] for e in encoded]


@torch.no_grad()
def expected_scores(model, sequences: list[list[int]], score_ids: list[int], max_batch_tokens: int = 16384) -> list[dict]:
    """For each token sequence (ending right before the score token): {"expected": E[score], "mass": p(0..5)}.

    Only the last position's hidden state is projected, and only onto the six score tokens, so the
    [B, T, V] logits never exist. Right padding is safe under causal attention (nothing real sees it)."""
    device = next(model.parameters()).device
    weight = model.output_weight[torch.tensor(score_ids, device=device)]  # [6, H]
    values = torch.tensor(list(SCORES), dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[dict | None] = [None] * len(sequences)
    start = 0
    while start < len(order):
        longest = len(sequences[order[start]])
        size = max(1, max_batch_tokens // max(1, longest))
        idx = order[start:start + size]
        start += size
        batch = torch.zeros(len(idx), longest, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, :len(sequences[i])] = torch.tensor(sequences[i])
        hidden = model(batch.to(device), return_hidden=True)  # [B, T, H]
        last = torch.tensor([len(sequences[i]) - 1 for i in idx], device=device)
        h = hidden[torch.arange(len(idx), device=device), last]  # [B, H]
        logits = (h.float() @ weight.float().T).double().cpu()  # [B, 6]
        # Mass on the score tokens needs the full softmax normalizer: one [B, V] product, B rows only.
        full_logits = (h.float() @ model.output_weight.float().T).double().cpu()
        log_norm = torch.logsumexp(full_logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        mass = torch.exp(torch.logsumexp(logits, dim=-1) - log_norm)
        for row, i in enumerate(idx):
            out[i] = {"expected": float((probs[row] * values).sum()), "mass": float(mass[row])}
    return out
