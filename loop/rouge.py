"""ROUGE-L similarity for the self-instruct near-duplicate filter (no dependency).

The filter compares every candidate prompt with every existing one (thousands x thousands), so
the LCS uses the bit-parallel algorithm of Allison & Dix / Crochemore et al. (one big-int add per
token of the second sequence) and a bag-of-words upper bound skips most pairs outright.
Tokenization follows the rouge_score package: lowercase, runs of [a-z0-9], no stemming.
"""
from __future__ import annotations

import re
from collections import Counter

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of a and b."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_f(a: list, b: list) -> float:
    """ROUGE-L F-measure (beta = 1) between two token lists."""
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


class RougeFilter:
    """Holds the prompts seen so far; `too_similar(text)` is True when any has ROUGE-L F > threshold."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self._items: list[tuple[list[str], Counter]] = []
        self._index: dict[str, list[int]] = {}

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        idx = len(self._items)
        self._items.append((toks, Counter(toks)))
        for tok in set(toks):
            self._index.setdefault(tok, []).append(idx)

    def max_similarity(self, text: str) -> float:
        toks = rouge_tokens(text)
        if not toks:
            return 0.0
        bag = Counter(toks)
        shared: Counter = Counter()
        for tok in bag:
            for idx in self._index.get(tok, ()):
                shared[idx] += 1
        best = 0.0
        for idx in shared:
            other, other_bag = self._items[idx]
            # LCS <= multiset intersection, so this F bounds the real one from above.
            overlap = sum((bag & other_bag).values())
            bound = 2 * overlap / (len(toks) + len(other))
            if bound <= best:
                continue
            best = max(best, rouge_l_f(other, toks))
        return best

    def too_similar(self, text: str) -> bool:
        return self.max_similarity(text) > self.threshold
