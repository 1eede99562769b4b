"""Checkpoint selection (stage 7 of an iteration): which DPO checkpoint becomes M(t+1).

The paper picks M(t+1) among the DPO run's checkpoints by evaluating them; here without a grader:
each candidate (every dpo.checkpoint_every steps, plus the last step) answers the same held-out
validation prompts as M(t), and a pairwise judge compares the two answers in both orders
(loop/pairwise.py: a win needs both orders to agree). The judge is eval.pairwise_judge or, when none
is given, M(t) itself: one fixed judge for every candidate, so their win rates are comparable.
The candidate with the best (win - loss) share is chosen, ties going to the later step (with equal
evidence, the longer-trained weights, i.e. what selection off would give).

Candidates live in models/M<t+1>.candidates/step<N>; the last step is models/M<t+1> itself. A chosen
earlier step replaces models/M<t+1>, whose last-step weights move to the candidates folder; the swap
is recorded in choice.json first so a run killed in the middle completes it on resume.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.distributed import Dist
from engine.sampler import SamplingParams

from .config import LoopConfig
from .generation import broadcast_object, generate_records
from .pairwise import judge_match, load_pairwise_template, match_summary
from .prompts import chat_ids
from .records import stable_seed, write_json
from .stages import F, pairwise_file

CANDIDATES_SUFFIX = ".candidates"
_STEP_RE = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class Candidate:
    name: str  # "step<N>"
    step: int
    path: Path


def candidates_dir(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + CANDIDATES_SUFFIX)


def list_candidates(model_dir: Path, last_step: int) -> list[Candidate]:
    """Every exported intermediate checkpoint, by step, then the last step (model_dir itself)."""
    found = []
    folder = candidates_dir(model_dir)
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and int(m.group(1)) < last_step:
            found.append(Candidate(d.name, int(m.group(1)), d))
    found.sort(key=lambda c: c.step)
    return found + [Candidate(f"step{last_step}", last_step, model_dir)]


def choose(results: list[dict]) -> dict:
    """The result with the highest win - loss (percent of prompts); ties: the later step."""
    return max(results, key=lambda r: (r["win"] - r["loss"], r["step"]))


def _answers(sampler, tok, dist: Dist, cfg: LoopConfig, prompts: list[dict], out: Path, t: int, who: str) -> dict:
    ec, sc = cfg.eval, cfg.select
    params = SamplingParams(temperature=ec.temperature, top_p=ec.top_p,
                            max_new_tokens=sc.max_new_tokens or ec.max_new_tokens, stop_token_ids=tuple(tok.stop_ids))
    requests = [{"id": p["id"], "ids": chat_ids(tok, p["prompt"]), "seed": stable_seed(cfg.run.seed, f"select {t}", p["id"])}
                for p in prompts]

    def record(req, c, rid):
        return {"id": rid, "text": c.text, "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}

    gens = generate_records(sampler, dist, requests, params, out, chunk_size=cfg.run.chunk_size, make_record=record,
                            desc=f"iter {t} select: {who} answers")
    return {g["id"]: g["text"] for g in gens}


def select_checkpoint(*, sampler_for: Callable[[Path], object], judge: Callable[[], tuple[object, object, str]],
                      tok, dist: Dist, cfg: LoopConfig, t: int, current: Path, candidates: list[Candidate],
                      prompts: list[dict], work: Path) -> dict:
    """Answers of M(t) and of every candidate on the validation prompts, each candidate judged against
    M(t) -> the stage summary (per-candidate win/tie/loss, the chosen one). All ranks call it; the
    returned summary is the same on every rank. sampler_for(path) gives the sampler of a checkpoint,
    judge() -> (judge sampler, its tokenizer, its name)."""
    # The last step first: its weights may be in memory, handed over by the DPO stage.
    order = [candidates[-1], *candidates[:-1]]
    answers = {}
    for c in order:
        answers[c.name] = _answers(sampler_for(c.path), tok, dist, cfg, prompts, work / f"answers_{c.name}.jsonl", t,
                                   c.name)
    reference = _answers(sampler_for(current), tok, dist, cfg, prompts, work / "answers_reference.jsonl", t,
                         current.name)
    judge_sampler, judge_tok, judge_name = judge()
    template = load_pairwise_template(cfg.eval.pairwise_template)
    ec, results = cfg.eval, []
    # Answers went through rank 0's records; every rank builds the same judge prompts from them.
    theirs = broadcast_object(reference if dist.is_main else None, dist)
    for c in candidates:
        mine = broadcast_object(answers[c.name] if dist.is_main else None, dist)
        # A prompt too long for the context with the answer budget has no answers: the same for all.
        both = [p for p in prompts if p["id"] in mine and p["id"] in theirs]
        records = judge_match(judge_sampler, judge_tok, dist, template=template, prompts=both, answers_a=mine,
                              answers_b=theirs, out_path=work / pairwise_file(c.name), run_seed=cfg.run.seed,
                              stage=f"iter {t} select: {c.name} vs {current.name}",
                              temperature=ec.judge_temperature,
                              top_p=1.0 if ec.judge_temperature == 0 else cfg.judge.top_p,
                              max_new_tokens=cfg.judge.max_new_tokens, chunk_size=cfg.run.chunk_size)
        if dist.is_main:
            s = match_summary(records, [p["id"] for p in both])
            results.append({"checkpoint": c.name, "step": c.step, "win": s["win"], "tie": s["tie"],
                            "loss": s["loss"], "unparsable": s["unparsable"], "inconsistent": s["inconsistent"],
                            "win_rate": s["win"] / 100.0})
    summary = {}
    if dist.is_main:
        best = choose(results)
        summary = {"against": current.name, "judge": judge_name, "prompts": len(prompts), "candidates": results,
                   "chosen": best["checkpoint"], "chosen_step": best["step"], "last_step": candidates[-1].step}
    return broadcast_object(summary, dist)


def apply_choice(model_dir: Path, chosen: str, last: str, work: Path) -> None:
    """Rank 0: make model_dir hold the chosen candidate's weights (idempotent; resumable)."""
    if chosen == last:
        return
    record = work / F.CHOICE
    if not record.exists():
        write_json(record, {"chosen": chosen, "last": last})
    elif json.loads(record.read_text()) != {"chosen": chosen, "last": last}:
        raise RuntimeError(f"{record}: an earlier run chose differently; remove the stage folder to choose again")
    folder = candidates_dir(model_dir)
    if not (folder / last).exists():  # the last step's weights go aside first, then the chosen ones move in
        os.replace(model_dir, folder / last)
    if not model_dir.exists():
        tmp = model_dir.with_name(model_dir.name + ".select")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder / chosen, tmp)
        os.replace(tmp, model_dir)


def validation_prompts(cfg: LoopConfig, world) -> list[dict]:
    """select.prompts_path (JSONL, as eval.prompts_path) or the world's fresh prompts; at most select.prompts."""
    if cfg.select.prompts_path is not None:
        from .stage_eval import load_eval_prompts

        return load_eval_prompts(Path(cfg.select.prompts_path))[:cfg.select.prompts]
    return world.validation_prompts(cfg.select.prompts)

