"""AI Feedback Training stages (1)-(4) of one iteration: new prompts, responses, self-judging, pairs.

Each stage reads and writes JSONL in explicit folders. None of them receives the world object
(only, for prompt filtering, its `is_valid_prompt` function): the ground-truth grader cannot leak
into self-rewarding, by construction.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.distributed import Dist, log
from engine.sampler import SamplingParams

from . import prompts as P
from .config import LoopConfig
from .eval import score_histogram
from .generation import generate_records, read_skipped
from .judge import judge_records, mean_score, scores_by_target
from .vote import vote_records
from .pairs import PairRules, build_pairs, mix_judge_pairs
from .records import read_jsonl, stable_seed, write_jsonl
from .stages import F


def _completion_fields(c) -> dict:
    return {"text": c.text, "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}


def gen_prompts(sampler, tok, dist: Dist, cfg: LoopConfig, *, ift_path: Path, earlier_prompt_paths: list[Path],
                work: Path, iteration: int, is_valid=None, chunk_hook=None) -> dict:
    """(1) self-instruct: work/attempts.jsonl (raw generations) -> work/prompts.jsonl {"id", "prompt"}."""
    pc = cfg.prompts
    ift = [r["prompt"] for r in read_jsonl(ift_path, ("id", "prompt"))]
    earlier = [r["prompt"] for p in earlier_prompt_paths for r in read_jsonl(p, ("id", "prompt"))]
    template = P.load_self_instruct_template(pc.template)
    attempts = int(pc.num_prompts * pc.attempts_factor)
    requests = P.self_instruct_requests(template, ift, earlier, attempts=attempts, n_ift=pc.shots_ift,
                                        n_generated=pc.shots_generated, run_seed=cfg.run.seed, iteration=iteration)
    for r in requests:
        r["ids"] = P.chat_ids(tok, r["text"]) if pc.chat else tok.encode(r["text"], bos=True)
    params = SamplingParams(temperature=pc.temperature, top_p=pc.top_p, max_new_tokens=pc.max_new_tokens,
                            stop_token_ids=tuple(tok.stop_ids), stop=() if pc.chat else ("\n",))

    def record(req, c, rid):
        return {"id": rid, **_completion_fields(c), "instruction": P.extract_instruction(c.text)}

    raw = generate_records(sampler, dist, requests, params, work / F.ATTEMPTS, chunk_size=cfg.run.chunk_size,
                           make_record=record, desc=f"iter {iteration}: prompts", chunk_hook=chunk_hook)
    if not dist.is_main:
        return {}
    kept, reasons = P.filter_instructions(
        raw, ift + earlier, want=pc.num_prompts, rouge_threshold=pc.rouge_threshold, min_words=pc.min_words,
        max_words=pc.max_words, banned_keywords=pc.banned_keywords, is_valid=is_valid)
    write_jsonl(work / F.ATTEMPTS, raw)
    write_jsonl(work / F.PROMPTS, ({"id": k["id"], "prompt": k["instruction"]} for k in kept))
    summary = {"attempts": len(raw), "prompts": len(kept), "filtered": dict(sorted(reasons.items()))}
    log(dist, f"iter {iteration} prompts: {json.dumps(summary)}")
    return summary


def gen_responses(sampler, tok, dist: Dist, cfg: LoopConfig, *, prompts_path: Path, work: Path, iteration: int,
                  chunk_hook=None) -> dict:
    """(2) N responses per prompt: work/responses.jsonl {"id", "prompt_id", "sample_index", "text", ...}."""
    rc = cfg.responses
    prompts = read_jsonl(prompts_path, ("id", "prompt"))
    requests = [{"id": p["id"], "ids": P.chat_ids(tok, p["prompt"]),
                 "seed": stable_seed(cfg.run.seed, "responses", p["id"])} for p in prompts]
    params = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens,
                            n=rc.n, stop_token_ids=tuple(tok.stop_ids))

    def record(req, c, rid):
        return {"id": rid, "prompt_id": req["id"], "sample_index": c.sample_index, **_completion_fields(c)}

    out = generate_records(sampler, dist, requests, params, work / F.RESPONSES, chunk_size=cfg.run.chunk_size,
                           make_record=record, desc=f"iter {iteration}: responses", chunk_hook=chunk_hook)
    if not dist.is_main:
        return {}
    write_jsonl(work / F.RESPONSES, out)
    lengths = [r["num_tokens"] for r in out]
    summary = {"prompts": len(prompts), "responses": len(out),
               "mean_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
               "truncated": sum(r["finish_reason"] == "length" for r in out)}
    log(dist, f"iter {iteration} responses: {json.dumps(summary)}")
    return summary


def judge_responses(sampler, tok, dist: Dist, cfg: LoopConfig, *, template: str, prompts_path: Path,
                    responses_path: Path, work: Path, iteration: int, chunk_hook=None) -> dict:
    """(3) K sampled judgments per response (judge.mode=vote: one vote record each, loop/vote.py):
    work/judgments.jsonl, work/scores.jsonl {"id", "scores", "mean"}."""
    jc = cfg.judge
    prompt_text = {p["id"]: p["prompt"] for p in read_jsonl(prompts_path, ("id", "prompt"))}
    responses = read_jsonl(responses_path, ("id", "prompt_id", "text"))
    if jc.mode == "vote":  # self-consistency instead of the LLM judge: nothing to sample (loop/vote.py)
        judgments = vote_records(responses) if dist.is_main else []
    else:
        items = [{"id": r["id"], "prompt": prompt_text[r["prompt_id"]], "response": r["text"]} for r in responses]
        judgments = judge_records(sampler, tok, dist, cfg, template=template, items=items,
                                  out_path=work / F.JUDGMENTS, k=jc.k, temperature=jc.temperature,
                                  top_p=jc.top_p, stage=f"iter {iteration}: judge", chunk_hook=chunk_hook)
    if not dist.is_main:
        return {}
    write_jsonl(work / F.JUDGMENTS, judgments)
    by_target = scores_by_target(judgments)
    # a response whose judge input was over-long has no judgments: no score
    write_jsonl(work / F.SCORES, ({"id": r["id"], "prompt_id": r["prompt_id"],
                                         "scores": by_target.get(r["id"], []),
                                         "mean": mean_score(by_target.get(r["id"], []))} for r in responses))
    scores = [j["score"] for j in judgments]
    parsed = sum(s is not None for s in scores)
    summary = {"judgments": len(scores), "parsed": parsed, "parse_rate": parsed / len(scores) if scores else 0.0,
               "histogram": score_histogram(scores),
               "responses_without_score": sum(mean_score(by_target.get(r["id"], [])) is None for r in responses)}
    log(dist, f"iter {iteration} judge: parse rate {summary['parse_rate']:.3f}, histogram {summary['histogram']}")
    return summary


def make_pairs(cfg: LoopConfig, *, prompts_path: Path, responses_path: Path, scores_path: Path, work: Path,
               judge_pairs_path: Path | None = None) -> dict:
    """(4) chosen/rejected per prompt: work/pairs.jsonl, work/outcomes.jsonl (every prompt, with drop reason).

    With judge_pairs_path (meta.enabled: stage 3m's judge pairs), pairs.jsonl holds the actor pairs, then
    the judge pairs mixed in at up to meta.judge_share of the total, each tagged "kind": "actor" | "judge";
    the summary's numbers stay the actor pairs', the mix is under "meta"."""
    prompts = read_jsonl(prompts_path, ("id", "prompt"))
    responses = read_jsonl(responses_path, ("id", "prompt_id", "sample_index", "text", "num_tokens"))
    scores = {s["id"]: s["mean"] for s in read_jsonl(scores_path, ("id", "mean"))}
    pc = cfg.pairs
    rules = PairRules(min_scored=pc.min_scored, length_control=pc.length_control, length_margin=pc.length_margin,
                      min_gap=pc.min_gap, distinct_texts=pc.distinct_texts)
    prompt_of = {r["id"]: r["prompt_id"] for r in responses}
    overlong = frozenset([k["request_id"] for k in read_skipped(responses_path)] +
                         [prompt_of[k["request_id"]] for k in read_skipped(scores_path.with_name(F.JUDGMENTS))])
    pairs, outcomes, reasons = build_pairs(prompts, responses, scores, rules, overlong)
    finish = {r["id"]: r.get("finish_reason", "stop") for r in responses}
    for p in pairs:
        p["chosen_finished"] = finish[p["chosen_id"]] == "stop"
        p["rejected_finished"] = finish[p["rejected_id"]] == "stop"
    mixed, mix = pairs, None
    if judge_pairs_path is not None:
        judge = read_jsonl(judge_pairs_path, ("id", "prompt", "chosen", "rejected", "chosen_finished",
                                              "rejected_finished", "kind"))
        used, mix = mix_judge_pairs(pairs, judge, share=cfg.meta.judge_share, seed=cfg.run.seed)
        mixed = [{**p, "kind": "actor"} for p in pairs] + used
    write_jsonl(work / F.PAIRS, mixed)
    write_jsonl(work / F.OUTCOMES, outcomes)
    gaps = [p["chosen_score"] - p["rejected_score"] for p in pairs]
    return {"prompts": len(prompts), "pairs": len(pairs), "dropped": dict(sorted(reasons.items())),
            "mean_chosen_score": sum(p["chosen_score"] for p in pairs) / len(pairs) if pairs else None,
            "mean_rejected_score": sum(p["rejected_score"] for p in pairs) / len(pairs) if pairs else None,
            "mean_gap": sum(gaps) / len(gaps) if gaps else None,
            "chosen_longer_frac": sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / len(pairs) if pairs else None,
            **({"meta": mix} if mix is not None else {})}
