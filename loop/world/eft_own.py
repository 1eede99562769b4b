"""EFT data from the model's own answers: the SFT baseline answers each EFT-train instruction, the world's
grader (the stand-in for human annotators) scores and justifies every distinct answer.

Why: a judge trained only on synthetic corruptions ranks those well but is worse than chance on its own
samples (bench/RESULTS.md: it copies the wrong number into its check). The paper's EFT data are human
judgments of real model answers; this is the world's equivalent. It runs before M1's SFT, never inside an
AIFT stage, and the held-out EFT eval set stays synthetic so judge metrics remain comparable across runs.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.distributed import Dist, log
from engine.sampler import SamplingParams

from ..config import LoopConfig
from ..eval import score_histogram
from ..generation import generate_records
from ..prompts import chat_ids
from ..records import read_jsonl, stable_seed, write_jsonl
from .seed import dense_ranks

FIELDS = ("id", "group_id", "prompt", "response", "rank", "judgment", "score")


def own_eft_records(sampler, tok, dist: Dist, cfg: LoopConfig, *, seed_eft: Path, grade, work: Path) -> dict:
    """work/eft_train.jsonl = the seed's synthetic EFT groups + one group of graded own answers per instruction."""
    synthetic = read_jsonl(seed_eft, FIELDS)
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

    samples = generate_records(sampler, dist, requests, params, work / "samples.jsonl", chunk_size=cfg.run.chunk_size,
                               make_record=record, desc="eft: own answers")
    if not dist.is_main:
        return {}
    by_group: dict[str, list[str]] = {}
    for s in samples:
        texts = by_group.setdefault(s["group_id"], [])
        if s["text"].strip() and s["text"] not in texts:
            texts.append(s["text"])
    own = []
    for gid, texts in by_group.items():
        grades = [grade(prompts[gid], t) for t in texts]
        ranks = dense_ranks([g.score for g in grades])
        for j, (text, g, rank) in enumerate(zip(texts, grades, ranks)):
            own.append({"id": f"{gid}-own{j}", "group_id": f"{gid}-own", "prompt": prompts[gid], "response": text,
                        "rank": rank, "judgment": g.justification, "score": float(g.score)})
    write_jsonl(work / "samples.jsonl", samples)
    write_jsonl(work / "eft_train.jsonl", synthetic + own)
    summary = {"synthetic": len(synthetic), "own": len(own),
               "own_distinct_per_instruction": round(len(own) / max(len(by_group), 1), 3),
               "own_histogram": score_histogram([r["score"] for r in own])}
    log(dist, f"eft own answers: {json.dumps(summary)}")
    return summary
