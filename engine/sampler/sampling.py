"""Sampling parameters and the batched next-token choice (greedy, temperature, top-k, top-p, seeds).

The math runs on the whole batch at once; only the one uniform draw per sampled row comes from that
row's own generator, so a seeded request gets the same tokens whatever it is batched with. Stop-string
detection lives here too: it decodes a window of recent tokens, so a stop string split across tokens
is still found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = whole vocabulary
    max_new_tokens: int = 128
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # log p(token) under the model (temperature 1, no truncation)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k={self.top_k} must be >= 0")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams: max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.n < 1:
            raise ValueError(f"SamplingParams: n={self.n} must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams: stop strings must be non-empty")


def sample_next(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, top_ks: torch.Tensor,
                generators: list[torch.Generator | None], want_logprobs: bool) -> tuple[list[int], list[float] | None]:
    """logits [S, V] (fp32); per-row temperature (0 = greedy), top_p, top_k (0 = off); generators[i] is None
    for greedy rows. Returns the chosen token ids and, if asked, their log-probs under the raw logits."""
    S, V = logits.shape
    greedy = temperatures == 0
    num_greedy = int(greedy.sum())
    # All-sampled batches (the common case) skip the argmax and the row selection copies.
    tokens = logits.argmax(-1) if num_greedy else None
    if num_greedy < S:
        rows = (~greedy).nonzero()[:, 0] if num_greedy else None
        sampled = range(S) if rows is None else rows.tolist()
        scaled = logits / temperatures[:, None] if rows is None else logits[rows] / temperatures[rows, None]
        k = top_ks if rows is None else top_ks[rows]
        if bool(((k > 0) & (k < V)).any()):
            k_eff = torch.where((k > 0) & (k < V), k, torch.full_like(k, V))
            kth = scaled.topk(int(k_eff.max()), dim=-1).values.gather(1, (k_eff - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        p = top_ps if rows is None else top_ps[rows]
        if bool((p < 1).any()):
            sorted_logits, order = scaled.sort(-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # Drop a token when the tokens strictly more likely already reach top_p (the first always stays).
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p[:, None]
            drop[:, 0] = False
            scaled = scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        cdf = scaled.softmax(-1).double().cumsum(-1)
        uniforms = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in sampled])
        uniforms = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
        picked = torch.searchsorted(cdf, uniforms, right=True)[:, 0].clamp(max=V - 1)
        tokens = picked if rows is None else tokens.index_put((rows,), picked)
    token_list = tokens.tolist()
    if not want_logprobs:
        return token_list, None
    chosen = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    return token_list, chosen.tolist()


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Char offset of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stop_window(stops: tuple[str, ...]) -> int:
    """How many trailing tokens to decode to see any stop string that the newest token could complete.

    A token decodes to at least one character except for partial UTF-8 bytes (up to 4 per character)."""
    return 4 * max(len(s) for s in stops) + 8
