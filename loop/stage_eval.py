"""Evaluation stage (7) for one model: generations on the held-out prompts (or the user's eval.prompts_path),
AlpacaEval export, the model as a reward model on eft_eval (paper Table 4), ground-truth grades when the
data source has a grader, the judge's self-pair accuracy on its own sampled answers (loop/self_pairs.py),
and the pairwise head to head against earlier models (loop/pairwise.py).

The grader is only ever passed here (and to seed building), never to the AIFT stages.
"""
from __future__ import annotations

from pathlib import Path

from engine.distributed import Dist
from engine.sampler import SamplingParams

from .config import LoopConfig
from .eval import export_alpaca_eval, head_to_head, length_stats, reward_model_metrics, score_histogram, verdict
from .generation import generate_records
from .judge import judge_records, mean_scores
from .prompts import chat_ids
from .pairwise import judge_match, load_pairwise_template, match_summary
from .self_pairs import measure_self_pairs
from .records import RecordError, iter_jsonl, read_jsonl, stable_seed, write_jsonl
from .stages import F, pairwise_file


def load_eval_prompts(path: Path) -> list[dict]:
    """{"id", "prompt", "dataset"?} from the held-out eval prompts or a user's set (eval.prompts_path):
    JSONL with "prompt" or AlpacaEval's "instruction"; "id" defaults to the line number, which is
    stable for a given file."""
    out, seen = [], set()
    for lineno, r in iter_jsonl(path):
        text = r.get("prompt", r.get("instruction"))
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{path}:{lineno}: needs a non-empty string field prompt (or instruction)")
        rid = str(r.get("id", f"line{lineno}"))
        if rid in seen:
            raise RecordError(f"{path}:{lineno}: duplicate id {rid!r}")
        seen.add(rid)
        out.append({"id": rid, "prompt": text, **({"dataset": r["dataset"]} if "dataset" in r else {})})
    return out


def eval_model(sampler, tok, dist: Dist, cfg: LoopConfig, *, name: str, eval_prompts_path: Path,
               eft_eval_path: Path | None, judge_template: str, work: Path, grader=None) -> dict:
    ec = cfg.eval
    prompts = load_eval_prompts(eval_prompts_path)
    requests = [{"id": p["id"], "ids": chat_ids(tok, p["prompt"]), "seed": stable_seed(cfg.run.seed, "eval", p["id"])}
                for p in prompts]
    params = SamplingParams(temperature=ec.temperature, top_p=ec.top_p, max_new_tokens=ec.max_new_tokens,
                            stop_token_ids=tuple(tok.stop_ids))
    by_id = {p["id"]: p for p in prompts}

    def record(req, c, rid):
        p = by_id[req["id"]]
        return {"id": rid, "prompt": p["prompt"], "text": c.text, "num_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason, **({"dataset": p["dataset"]} if "dataset" in p else {})}

    gens = generate_records(sampler, dist, requests, params, work / F.GENERATIONS,
                            chunk_size=cfg.run.chunk_size, make_record=record, desc=f"eval {name}: generate")
    rm_judgments = []
    eft_eval = read_jsonl(eft_eval_path, ("id", "group_id", "prompt", "response", "rank")) \
        if (eft_eval_path is not None and ec.reward_metrics) else []
    if eft_eval:
        rm_judgments = judge_records(sampler, tok, dist, cfg, template=judge_template, items=eft_eval,
                                     out_path=work / F.RM_JUDGMENTS, k=ec.judge_k,
                                     temperature=ec.judge_temperature, top_p=1.0 if ec.judge_temperature == 0 else
                                     cfg.judge.top_p, stage=f"eval {name}: judge eft_eval")
    self_pairs = None
    if grader is not None and ec.self_pairs > 0:  # every rank samples and judges; rank 0 grades
        self_pairs = measure_self_pairs(sampler, tok, dist, cfg, name=name, prompts=prompts,
                                        judge_template=judge_template, work=work, grader=grader)
    if not dist.is_main:
        return {}
    write_jsonl(work / F.GENERATIONS, gens)
    export_alpaca_eval(work / F.ALPACA_EVAL, gens, generator=name)
    summary = {"model": name, "length": length_stats([g["num_tokens"] for g in gens], [g["text"] for g in gens]),
               "truncated": sum(g["finish_reason"] == "length" for g in gens)}
    if eft_eval:
        write_jsonl(work / F.RM_JUDGMENTS, rm_judgments)
        scores = mean_scores(rm_judgments)
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
        write_jsonl(work / F.GRADES, grades)
        n = len(grades)
        summary["grader"] = {"mean_score": sum(g["score"] for g in grades) / n if n else None,
                             "accuracy": 100.0 * sum(g["correct"] for g in grades) / n if n else None,
                             "histogram": score_histogram([g["score"] for g in grades])}
    if self_pairs is not None:
        summary["self_pairs"], responses, judgments = self_pairs
        write_jsonl(work / F.SELF_RESPONSES, responses)
        write_jsonl(work / F.SELF_JUDGMENTS, judgments)
    return summary


def head_to_head_from_grades(grades_a: Path, grades_b: Path) -> dict:
    """Win rate of model A over B on the same prompts from the ground-truth grader's scores.

    The grader is pointwise and deterministic: it never sees the two answers together, so there is no
    presentation order and one verdict per prompt is the whole result ("orders": 1). The pairwise
    judge (loop/pairwise.py) is the one judged in both orders."""
    a = {g["id"]: g["score"] for g in read_jsonl(grades_a, ("id", "score"))}
    b = {g["id"]: g["score"] for g in read_jsonl(grades_b, ("id", "score"))}
    verdicts = [verdict(a[i], b[i]) for i in sorted(set(a) & set(b))]
    return {**head_to_head(verdicts, verdicts), "orders": 1}


def pairwise_matches(sampler, tok, dist: Dist, cfg: LoopConfig, *, name: str, work: Path,
                     opponents: dict[str, Path], judge: str) -> dict:
    """name's eval answers (work/generations.jsonl) against each opponent's generations file, judged
    pairwise by `sampler` in both orders -> work/pairwise_<opponent>.jsonl and {opponent: summary}."""
    ec = cfg.eval
    template = load_pairwise_template(ec.pairwise_template)
    mine = read_jsonl(work / F.GENERATIONS, ("id", "prompt", "text"))
    out = {}
    for opp, path in opponents.items():
        theirs = {g["id"]: g["text"] for g in read_jsonl(path, ("id", "text"))}
        prompts = [{"id": g["id"], "prompt": g["prompt"]} for g in mine if g["id"] in theirs]
        out_path = work / pairwise_file(opp)
        records = judge_match(sampler, tok, dist, template=template, prompts=prompts,
                              answers_a={g["id"]: g["text"] for g in mine}, answers_b=theirs, out_path=out_path,
                              run_seed=cfg.run.seed, stage=f"eval {name}: pairwise vs {opp}",
                              temperature=ec.judge_temperature,
                              top_p=1.0 if ec.judge_temperature == 0 else cfg.judge.top_p,
                              max_new_tokens=cfg.judge.max_new_tokens, chunk_size=cfg.run.chunk_size)
        if dist.is_main:
            write_jsonl(out_path, records)
            out[opp] = {"judge": judge, **match_summary(records, [p["id"] for p in prompts])}
    return out
