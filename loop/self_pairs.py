"""Self-pair accuracy (issue 13, gate 2): does the model's judge order its OWN answers as the grader does?

The reward-model metrics (loop/eval.py) measure the judge on the held-out EFT set, whose answers were written
by the seed builder. What self-rewarding needs is narrower: on N responses the model itself samples for one
prompt, the judge's scores must order the responses the way the ground-truth grader does, or the max/min
pairs teach nothing. So, for the first `eval.self_pairs` held-out prompts, the model under evaluation
samples responses exactly as AIFT stage 2 does (responses.n, .temperature, .top_p, .max_new_tokens) and
judges them as stage 3 does with the LLM judge (judge.k, .temperature, .top_p, .mode, the run's judge
template; sampled when judge.mode=vote); the grader scores every response. The same responses are also
scored by the self-consistency vote (loop/vote.py, judge.mode=vote's score), under "vote". Over the
response pairs of one prompt with DIFFERENT grades:

- accuracy % = (agree + ties / 2) / pairs (a judge tie is half right, so a constant judge scores 50);
- agree / disagree / tie: the judge's mean score orders the pair as the grader, the other way, or equally;
- prompts_with_pair %: prompts whose responses got at least two different grades (no such pair, no signal).

A response whose judgments had no parsable score is left out of its prompt (counted as "unscored"), as the
pair builder (loop/pairs.py) leaves it out. Evaluation only: the grader is passed here from the eval stage,
never to the AIFT stages.
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

from engine.distributed import Dist
from engine.sampler import SamplingParams

from .config import LoopConfig
from .generation import broadcast_object, generate_records
from .judge import judge_records, mean_scores
from .prompts import chat_ids
from .records import stable_seed
from .stages import F
from .vote import vote_records


def self_pair_accuracy(responses: list[dict], grades: dict[str, float], scores: dict[str, float | None]) -> dict:
    """responses: {"id", "prompt_id"}; grades: response id -> grader score; scores: id -> judge mean or None."""
    by_prompt: dict[str, list[str]] = {}
    for r in responses:
        by_prompt.setdefault(r["prompt_id"], []).append(r["id"])
    agree = disagree = tie = unscored = with_pair = 0
    for ids in by_prompt.values():
        scored = [i for i in ids if scores.get(i) is not None]
        unscored += len(ids) - len(scored)
        pairs = [(a, b) for a, b in combinations(scored, 2) if grades[a] != grades[b]]
        with_pair += bool(pairs)
        for a, b in pairs:
            g = (grades[a] > grades[b]) - (grades[a] < grades[b])
            j = (scores[a] > scores[b]) - (scores[a] < scores[b])
            agree += j == g
            disagree += j == -g
            tie += j == 0
    n = agree + disagree + tie
    # None, not NaN, where nothing was measured: done.json stays strict JSON and the report prints "-"
    return {"accuracy": 100.0 * (agree + 0.5 * tie) / n if n else None,
            "agree": agree, "disagree": disagree, "tie": tie, "num_pairs": n,
            "prompts": len(by_prompt),
            "prompts_with_pair": 100.0 * with_pair / len(by_prompt) if by_prompt else None,
            "unscored": unscored}


def measure_self_pairs(sampler, tok, dist: Dist, cfg: LoopConfig, *, name: str, prompts: list[dict],
                       judge_template: str, work: Path, grader) -> tuple[dict, list[dict], list[dict]]:
    """Sample, judge and grade; returns (summary, responses, judgments) on rank 0, ({}, [], []) elsewhere.

    Every rank takes part in sampling and judging; records are resumable as every generation
    (work/self_responses.jsonl, work/self_judgments.jsonl). Seeds are the eval stage's own, so these samples
    never repeat an AIFT iteration's."""
    rc, jc = cfg.responses, cfg.judge
    prompts = prompts[:cfg.eval.self_pairs]
    text = {p["id"]: p["prompt"] for p in prompts}
    requests = [{"id": p["id"], "ids": chat_ids(tok, p["prompt"]),
                 "seed": stable_seed(cfg.run.seed, "eval self pairs", p["id"])} for p in prompts]
    params = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens, n=rc.n,
                            stop_token_ids=tuple(tok.stop_ids))

    def record(req, c, rid):
        return {"id": rid, "prompt_id": req["id"], "sample_index": c.sample_index, "text": c.text,
                "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}

    responses = generate_records(sampler, dist, requests, params, work / F.SELF_RESPONSES,
                                 chunk_size=cfg.run.chunk_size, make_record=record,
                                 desc=f"eval {name}: self-pair responses")
    responses = broadcast_object(responses, dist)  # judging is sharded over every rank
    items = [{"id": r["id"], "prompt": text[r["prompt_id"]], "response": r["text"]} for r in responses]
    judgments = judge_records(sampler, tok, dist, cfg, template=judge_template, items=items,
                              out_path=work / F.SELF_JUDGMENTS, k=jc.k, temperature=jc.temperature, top_p=jc.top_p,
                              stage=f"eval {name}: self-pair judge")
    if not dist.is_main:
        return {}, [], []
    for r in responses:
        g = grader(text[r["prompt_id"]], r["text"])
        r["grade"], r["correct"] = float(g.score), bool(g.correct)
    grades = {r["id"]: r["grade"] for r in responses}
    summary = self_pair_accuracy(responses, grades, mean_scores(judgments))
    # the ground truth of the same samples: the policy at the sampling temperature (greedy is the eval's own)
    n = len(responses)
    summary["sampled_grader"] = {"responses": n,
                                 "accuracy": 100.0 * sum(r["correct"] for r in responses) / n if n else None,
                                 "mean_score": sum(r["grade"] for r in responses) / n if n else None}
    # the self-consistency vote on the same responses (judge.mode=vote's score; free: nothing is sampled)
    summary["vote"] = self_pair_accuracy(responses, grades, mean_scores(vote_records(responses)))
    summary["samples"] = {"n": rc.n, "temperature": rc.temperature, "judge_k": jc.k, "judge_mode": jc.mode}
    return summary, responses, judgments
