"""EFT labels for the model's own answers: the world's grader, the stand-in for human annotators, scores
and justifies each answer, and the scores rank the answers of one instruction as a group.

The loop's EFT stage (loop/stage_eft.py) samples the answers and writes the records; this file only
labels them, so the world depends on nothing in the loop.
"""
from __future__ import annotations

from .seed import dense_ranks


def graded_groups(prompts: dict[str, str], answers: dict[str, list[str]], grade) -> list[dict]:
    """EFT records {"id", "group_id", "prompt", "response", "rank", "judgment", "score"}: one group
    "<group>-own" per instruction of `answers` (group id -> distinct answers), graded by grade(prompt, answer)."""
    own = []
    for gid, texts in answers.items():
        grades = [grade(prompts[gid], t) for t in texts]
        ranks = dense_ranks([g.score for g in grades])
        for j, (text, g, rank) in enumerate(zip(texts, grades, ranks)):
            own.append({"id": f"{gid}-own{j}", "group_id": f"{gid}-own", "prompt": prompts[gid], "response": text,
                        "rank": rank, "judgment": g.justification, "score": float(g.score)})
    return own
