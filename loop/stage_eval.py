"""Evaluation stage (7) for one model: held-out generations, AlpacaEval export, the model as a reward
model on eft_eval (paper Table 4), and, when the data source has one, ground-truth grades.

The grader is only ever passed here (and to seed building), never to the AIFT stages.
"""
from __future__ import annotations

from pathlib import Path

from engine.distributed import Dist
from engine.sampler import SamplingParams

from .config import LoopConfig
from .eval import export_alpaca_eval, head_to_head, length_stats, reward_model_metrics, score_histogram, verdict
from .generation import generate_records
from .judge import mean_score
from .prompts import chat_ids
from .records import read_jsonl, stable_seed, write_jsonl
from .stage_aift import judge_records


def eval_model(sampler, tok, dist: Dist, cfg: LoopConfig, *, name: str, eval_prompts_path: Path,
               eft_eval_path: Path | None, judge_template: str, work: Path, grader=None) -> dict:
    ec = cfg.eval
    prompts = read_jsonl(eval_prompts_path, ("id", "prompt"))
    requests = [{"id": p["id"], "ids": chat_ids(tok, p["prompt"]), "seed": stable_seed(cfg.run.seed, "eval", p["id"])}
                for p in prompts]
    params = SamplingParams(temperature=ec.temperature, top_p=ec.top_p, max_new_tokens=ec.max_new_tokens,
                            stop_token_ids=tuple(tok.stop_ids))
    text_of = {p["id"]: p["prompt"] for p in prompts}

    def record(req, c, rid):
        return {"id": rid, "prompt": text_of[req["id"]], "text": c.text, "num_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason}

    gens = generate_records(sampler, dist, requests, params, work / "generations.jsonl",
                            chunk_size=cfg.run.chunk_size, make_record=record, desc=f"eval {name}: generate")
    rm_judgments = []
    eft_eval = read_jsonl(eft_eval_path, ("id", "group_id", "prompt", "response", "rank")) \
        if (eft_eval_path is not None and ec.reward_metrics) else []
    if eft_eval:
        rm_judgments = judge_records(sampler, tok, dist, cfg, template=judge_template, items=eft_eval,
                                     out_path=work / "rm_judgments.jsonl", k=ec.judge_k,
                                     temperature=ec.judge_temperature, top_p=1.0 if ec.judge_temperature == 0 else
                                     cfg.judge.top_p, stage=f"eval {name}: judge eft_eval")
    if not dist.is_main:
        return {}
    write_jsonl(work / "generations.jsonl", gens)
    export_alpaca_eval(work / "alpaca_eval.json", gens, generator=name)
    summary = {"model": name, "length": length_stats([g["num_tokens"] for g in gens], [g["text"] for g in gens]),
               "truncated": sum(g["finish_reason"] == "length" for g in gens)}
    if eft_eval:
        write_jsonl(work / "rm_judgments.jsonl", rm_judgments)
        by_target: dict[str, list] = {}
        for j in rm_judgments:
            by_target.setdefault(j["target_id"], []).append(j["score"])
        scores = {t: mean_score(s) for t, s in by_target.items()}
        all_scores = [j["score"] for j in rm_judgments]
        summary["reward_model"] = reward_model_metrics(eft_eval, scores)
        summary["reward_model"]["parse_rate"] = (sum(s is not None for s in all_scores) / len(all_scores)
                                                 if all_scores else 0.0)
        summary["reward_model"]["histogram"] = score_histogram(all_scores)
    if grader is not None:
        grades = []
        for g in gens:
            gr = grader(g["prompt"], g["text"])
            grades.append({"id": g["id"], "score": float(gr.score), "correct": bool(gr.correct)})
        write_jsonl(work / "grades.jsonl", grades)
        n = len(grades)
        summary["grader"] = {"mean_score": sum(g["score"] for g in grades) / n if n else None,
                             "accuracy": 100.0 * sum(g["correct"] for g in grades) / n if n else None,
                             "histogram": score_histogram([g["score"] for g in grades])}
    return summary


def head_to_head_from_grades(grades_a: Path, grades_b: Path) -> dict:
    """Win rate of model A over B on the same prompts from a pointwise judge's scores.

    A pointwise judge sees one response at a time, so its verdicts in the two presentation orders
    coincide; both orders still go through head_to_head so a pairwise judge can replace it unchanged."""
    a = {g["id"]: g["score"] for g in read_jsonl(grades_a, ("id", "score"))}
    b = {g["id"]: g["score"] for g in read_jsonl(grades_b, ("id", "score"))}
    ids = sorted(set(a) & set(b))
    ab = [verdict(a[i], b[i]) for i in ids]
    ba = [-verdict(b[i], a[i]) for i in ids]
    return head_to_head(ab, ba)
