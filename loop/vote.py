"""judge.mode = "vote": self-consistency in place of the LLM judge (ScPO, Prasad et al., arXiv 2411.04109).

A response's score is 5 x the share of the responses to the same instruction that give the same answer,
so the max/min pair of loop/pairs.py becomes (the most frequent answer, the least frequent one), ScPO's
vote-count pair. ScPO trains iterative DPO on exactly such pairs (Llama-3 8B: +22.7 points on GSM8K);
it needs tasks whose answer is short enough that equal answers are equal text, as the embedded world's
one-number answers are. Two answers are equal when their text is equal after casefolding, collapsing
whitespace and dropping trailing sentence punctuation; free-text answers rarely are, and then every
response of a prompt scores 5/N and the prompt gives no pair ("all tied" in outcomes.jsonl).

The model's own LLM judge is not asked here: the EFT-trained judge is still measured in evaluation (its
reward-model metrics on eft_eval use the paper's sampled judge), and the report names the mode. The
records have the judgment records' fields (loop/judge.py), one per response, so scores.jsonl, the pair
builder and the report read them unchanged.
"""
from __future__ import annotations

import re
from collections import Counter

_SPACE = re.compile(r"\s+")


def answer_key(text: str) -> str:
    """What two responses must share to count as the same answer."""
    return _SPACE.sub(" ", text).strip().casefold().rstrip(".!").rstrip()


def vote_records(responses: list[dict]) -> list[dict]:
    """Response records {"id", "prompt_id", "text"} (stage 2's) -> one judgment record per response.

    score = 5 * (the prompt's responses with this answer) / (the prompt's responses): a float in (0, 5]."""
    counts: dict[str, Counter] = {}
    sizes: Counter = Counter()
    for r in responses:
        counts.setdefault(r["prompt_id"], Counter())[answer_key(r["text"])] += 1
        sizes[r["prompt_id"]] += 1
    out = []
    for r in responses:
        c, n = counts[r["prompt_id"]][answer_key(r["text"])], sizes[r["prompt_id"]]
        out.append({"id": f"{r['id']}-vote", "target_id": r["id"], "sample_index": 0,
                    "text": f"{c} of {n} responses give this answer", "num_tokens": 0, "finish_reason": "vote",
                    "score": 5.0 * c / n})
    return out
