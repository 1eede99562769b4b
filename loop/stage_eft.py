"""The EFT (evaluation fine-tuning) stage: judge-training data from the SFT baseline, before M1's SFT.

Two sources, one stage folder (run/eft/):

- OASST (paper, sec. 3): candidates are instructions with several human-ranked responses; the baseline
  judges each. Groups are split into train and eval first, so the eval groups stay whole and unfiltered
  (they measure agreement with humans, filtering them by agreement would bias that). For train, the
  baseline's judgment of a response is kept only when its group's judge ordering equals the human
  ordering (ties included), and then the most common score is down-sampled to at most `cap_ratio` x
  the second most common score's count.
- The world, data.eft_own_samples = k > 0: the baseline answers each EFT-train instruction k times; the
  world's grader (the stand-in for human annotators, loop/world/eft_own.py) scores and justifies every
  distinct answer. Why: a judge trained only on synthetic corruptions ranks those well but is worse than
  chance on its own samples (bench/RESULTS.md: it copies the wrong number into its check). The held-out
  EFT eval set stays synthetic so judge metrics remain comparable across runs.

The stage generates; the world only grades: it never sees the loop (loop -> world, not back).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from itertools import combinations
from pathlib import Path

from engine.distributed import Dist, log
from engine.sampler import SamplingParams

from .config import LoopConfig
from .eval import score_histogram
from .generation import generate_records
from .judge import judge_records
from .prompts import chat_ids
from .records import read_jsonl, stable_seed, write_jsonl
from .stages import SEED, F

EFT_FIELDS = ("id", "group_id", "prompt", "response", "rank", "judgment", "score")
CANDIDATE_FIELDS = ("id", "group_id", "prompt", "response", "rank")


def build_eft(sampler, tok, dist: Dist, cfg: LoopConfig, *, run_dir: Path, template: str, grade, work: Path) -> dict:
    """The stage: the SFT baseline's sampler -> work/eft_train.jsonl (and, OASST, work/eft_eval.jsonl);
    grade: the world's grader (data.eft_own_samples), else None. Returns the stage summary."""
    if cfg.data.source == "oasst":
        return ranked_eft(sampler, tok, dist, cfg, candidates=SEED.path(run_dir, F.EFT_CANDIDATES),
                          template=template, work=work)
    return own_eft(sampler, tok, dist, cfg, seed_eft=SEED.path(run_dir, F.EFT_TRAIN), grade=grade, work=work)


def ranked_eft(sampler, tok, dist: Dist, cfg: LoopConfig, *, candidates: Path, template: str, work: Path) -> dict:
    """OASST: the baseline judges the ranked candidates; judgments agreeing with the human ranking become EFT."""
    cands = read_jsonl(candidates, CANDIDATE_FIELDS)
    jc = cfg.judge
    judgments = judge_records(sampler, tok, dist, cfg, template=template, items=cands, out_path=work / F.JUDGMENTS,
                              k=1, temperature=jc.temperature, top_p=jc.top_p, stage="eft: judge candidates")
    if not dist.is_main:
        return {}
    by_id = {j["target_id"]: {"judgment": j["text"], "score": j["score"]} for j in judgments}
    train, evals, summary = select_eft(cands, by_id, eval_fraction=cfg.data.eft_eval_fraction, seed=cfg.run.seed,
                                       cap_ratio=cfg.data.eft_cap_ratio)
    write_jsonl(work / F.EFT_TRAIN, train)
    write_jsonl(work / F.EFT_EVAL, evals)
    return summary


def own_eft(sampler, tok, dist: Dist, cfg: LoopConfig, *, seed_eft: Path, grade, work: Path) -> dict:
    """World: work/eft_train.jsonl = the seed's synthetic EFT groups + one group of graded own answers per
    instruction."""
    from .world.eft_own import graded_groups  # here: the world package loads only in world runs

    synthetic = read_jsonl(seed_eft, EFT_FIELDS)
    prompts: dict[str, str] = {}
    for r in synthetic:
        prompts.setdefault(r["group_id"], r["prompt"])
    rc = cfg.responses
    requests = [{"id": gid, "ids": chat_ids(tok, text), "seed": stable_seed(cfg.run.seed, "eft_own", gid)}
                for gid, text in prompts.items()]
    params = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens,
                            n=cfg.data.eft_own_samples, stop_token_ids=tuple(tok.stop_ids))

    def record(req, c, rid):
        return {"id": rid, "group_id": req["id"], "text": c.text}

    samples = generate_records(sampler, dist, requests, params, work / F.SAMPLES, chunk_size=cfg.run.chunk_size,
                               make_record=record, desc="eft: own answers")
    if not dist.is_main:
        return {}
    by_group: dict[str, list[str]] = {}  # the distinct non-empty answers: a repeated answer is graded once
    for s in samples:
        texts = by_group.setdefault(s["group_id"], [])
        if s["text"].strip() and s["text"] not in texts:
            texts.append(s["text"])
    own = graded_groups(prompts, by_group, grade)
    write_jsonl(work / F.SAMPLES, samples)
    write_jsonl(work / F.EFT_TRAIN, synthetic + own)
    summary = {"synthetic": len(synthetic), "own": len(own),
               "own_distinct_per_instruction": round(len(own) / max(len(by_group), 1), 3),
               "own_histogram": score_histogram([r["score"] for r in own])}
    log(dist, f"eft own answers: {json.dumps(summary)}")
    return summary


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
