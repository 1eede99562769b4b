"""Preference pairs from self-judged responses: chosen = highest mean score, rejected = lowest.

A prompt yields no pair when too few of its responses got a valid score, or when the best and
worst mean scores are equal (a tie teaches DPO nothing). Every prompt gets an outcome record with
its drop reason, so the report can say why the pair count is what it is.

With `distinct_texts` the candidates are a prompt's distinct response texts, not its samples: a text's score
is the mean over every sample that wrote it (more judgments per answer, less judge noise), and chosen and
rejected are always different texts. A small policy often writes the same answer in several samples; the
paper's rule then pairs two copies of one text that sampled judgments happened to score apart, a pair
with no DPO gradient (the chosen and rejected log-ratios cancel) that only the NLL term sees.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from .records import stable_seed

DROP_TOO_FEW_SCORED = "too_few_scored"
DROP_TIE = "tie"
DROP_NO_RESPONSES = "no_responses"
DROP_SAME_TEXT = "same_text"  # distinct_texts: every scored sample wrote the same text
DROP_OVERLONG = "overlong"  # the prompt or judge input did not fit the context (loop/generation.py skipped it)


@dataclass(frozen=True)
class PairRules:
    min_scored: int = 2  # responses with a valid mean score needed to form a pair
    length_control: bool = False  # chosen = shortest response within `length_margin` of the top score
    length_margin: float = 0.0
    min_gap: float = 0.0  # drop pairs whose chosen - rejected score gap is <= this (0 = only exact ties)
    distinct_texts: bool = False  # candidates are distinct texts, each scored by the mean over its samples


def build_pairs(prompts: list[dict], responses: list[dict], response_scores: dict[str, float | None],
                rules: PairRules, overlong: frozenset[str] = frozenset()) -> tuple[list[dict], list[dict], Counter]:
    """Returns (pairs, outcomes, drop_reason_counts).

    prompts: {"id", "prompt"}; responses: {"id", "prompt_id", "sample_index", "text", "num_tokens"};
    response_scores: response id -> mean judge score or None (no parsable judgment).
    overlong: prompt ids whose responses or judgments were skipped as over-long; when such a prompt
    gets no pair for lack of (scored) responses, that is its drop reason.
    Ties among equally-scored responses break on sample index, so the result is deterministic.
    """
    by_prompt: dict[str, list[dict]] = {}
    for r in responses:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    pairs, outcomes, reasons = [], [], Counter()
    for p in prompts:
        cands = sorted(by_prompt.get(p["id"], []), key=lambda r: r["sample_index"])
        scored = [(response_scores.get(r["id"]), r) for r in cands]
        scored = [(s, r) for s, r in scored if s is not None]
        outcome = {"id": p["id"], "num_responses": len(cands), "num_scored": len(scored),
                   "scores": [response_scores.get(r["id"]) for r in cands]}
        reason = None
        if not cands:
            reason = DROP_OVERLONG if p["id"] in overlong else DROP_NO_RESPONSES
        elif len(scored) < max(2, rules.min_scored):
            reason = DROP_OVERLONG if p["id"] in overlong else DROP_TOO_FEW_SCORED
        elif len(pool := _pool_texts(scored) if rules.distinct_texts else scored) < 2:
            reason = DROP_SAME_TEXT  # only distinct_texts can leave fewer than two candidates here
        else:
            scored = pool
            top = max(s for s, _ in scored)
            if rules.length_control:
                near_top = [(s, r) for s, r in scored if s >= top - rules.length_margin]
                chosen_score, chosen = min(near_top, key=lambda sr: (sr[1]["num_tokens"], -sr[0], sr[1]["sample_index"]))
            else:
                chosen_score, chosen = next((s, r) for s, r in scored if s == top)
            rejected_score, rejected = min(
                ((s, r) for s, r in scored if r is not chosen), key=lambda sr: (sr[0], -sr[1]["sample_index"]))
            if chosen_score - rejected_score <= rules.min_gap:
                reason = DROP_TIE
            else:
                pairs.append({
                    "id": p["id"], "prompt": p["prompt"],
                    "chosen": chosen["text"], "rejected": rejected["text"],
                    "chosen_id": chosen["id"], "rejected_id": rejected["id"],
                    "chosen_score": chosen_score, "rejected_score": rejected_score,
                })
        outcome["dropped"] = reason
        if reason:
            reasons[reason] += 1
        outcomes.append(outcome)
    return pairs, outcomes, reasons


def _pool_texts(scored: list[tuple[float, dict]]) -> list[tuple[float, dict]]:
    """One (mean score over its samples, first sample) per distinct text, in sample order."""
    by_text: dict[str, list[tuple[float, dict]]] = {}
    for s, r in scored:
        by_text.setdefault(r["text"], []).append((s, r))
    return [(sum(s for s, _ in group) / len(group), group[0][1]) for group in by_text.values()]


def mix_judge_pairs(actor: list[dict], judge: list[dict], *, share: float, seed: int) -> tuple[list[dict], dict]:
    """(the judge pairs DPO gets, the mix's summary): as many as there are, up to `share` of all pairs.

    Every actor pair is kept; the judge pairs kept are those with the lowest stable_seed(seed, id), a
    subsample that depends on the run seed and the pairs' ids only (not on file order or world size),
    returned in their original order."""
    room = math.floor(share * len(actor) / (1.0 - share) + 1e-9)  # n / (actor + n) <= share
    n = min(len(judge), room)
    keep = set(sorted((p["id"] for p in judge), key=lambda i: stable_seed(seed, "judge_share", i))[:n])
    used = [p for p in judge if p["id"] in keep]
    total = len(actor) + n
    return used, {"judge_pairs_built": len(judge), "judge_pairs_used": n, "judge_pairs_over_share": len(judge) - n,
                  "judge_share_target": share, "judge_share_used": n / total if total else 0.0,
                  "actor_pairs": len(actor), "total_pairs": total}
