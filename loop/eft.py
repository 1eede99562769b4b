"""Building EFT (evaluation fine-tuning) data from the SFT baseline's own judgments (paper, sec. 3).

Candidates are instructions with several human-ranked responses. Groups are split into train and
eval first, so the eval groups stay whole and unfiltered (they measure agreement with humans,
filtering them by agreement would bias that). For train, the baseline's judgment of a response is
kept only when its group's judge ordering equals the human ordering (ties included), and then the
most common score is down-sampled to at most `cap_ratio` x the second most common score's count.
"""
from __future__ import annotations

import random
from collections import Counter
from itertools import combinations


def _ordering_agrees(items: list[tuple[float, int]]) -> bool:
    for (s1, r1), (s2, r2) in combinations(items, 2):
        if (s1 > s2) - (s1 < s2) != (r1 < r2) - (r1 > r2):
            return False
    return True


def select_eft(candidates: list[dict], judgments: dict[str, dict], *, eval_fraction: float, seed: int,
               cap_ratio: float = 1.0) -> tuple[list[dict], list[dict], dict]:
    """candidates: {"id", "group_id", "prompt", "response", "rank"};
    judgments: candidate id -> {"judgment": text, "score": float | None}.
    Returns (eft_train, eft_eval, stats); records follow the EFT format of docs/DATA.md."""
    groups: dict[str, list[dict]] = {}
    for c in candidates:
        groups.setdefault(c["group_id"], []).append(c)
    group_ids = sorted(groups)
    random.Random(seed).shuffle(group_ids)
    n_eval = round(len(group_ids) * eval_fraction)
    eval_ids, train_ids = set(group_ids[:n_eval]), group_ids[n_eval:]

    def record(c):
        j = judgments.get(c["id"]) or {}
        return {"id": c["id"], "group_id": c["group_id"], "prompt": c["prompt"], "response": c["response"],
                "rank": c["rank"], "judgment": j.get("judgment", ""), "score": j.get("score")}

    eft_eval = [record(c) for gid in sorted(eval_ids) for c in groups[gid]]
    kept, disagree, too_few = [], 0, 0
    for gid in train_ids:
        scored = [c for c in groups[gid] if (judgments.get(c["id"]) or {}).get("score") is not None]
        if len(scored) < 2:
            too_few += 1
            continue
        if not _ordering_agrees([(judgments[c["id"]]["score"], c["rank"]) for c in scored]):
            disagree += 1
            continue
        kept.extend(record(c) for c in scored)
    counts = Counter(round(r["score"]) for r in kept)
    dropped_common = 0
    if len(counts) >= 2:
        (common, n_common), (_, n_second) = counts.most_common(2)
        cap = max(1, int(n_second * cap_ratio))
        if n_common > cap:
            rng = random.Random(seed + 1)
            common_idx = [i for i, r in enumerate(kept) if round(r["score"]) == common]
            drop = set(rng.sample(common_idx, n_common - cap))
            kept = [r for i, r in enumerate(kept) if i not in drop]
            dropped_common = len(drop)
    kept.sort(key=lambda r: r["id"])
    stats = {"train_groups": len(train_ids), "eval_groups": len(eval_ids), "groups_disagreeing": disagree,
             "groups_too_few_scored": too_few, "downsampled_most_common": dropped_common,
             "eft_train": len(kept), "eft_eval": len(eft_eval),
             "train_score_counts": dict(sorted(Counter(str(round(r["score"])) for r in kept).items()))}
    return kept, eft_eval, stats
