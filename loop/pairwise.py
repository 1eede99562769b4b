"""Head to head without a grader, as the paper evaluates (GPT-4 there): a pairwise judge in both orders.

The judge (eval.pairwise_judge, or the model being evaluated) reads the prompt of
templates/pairwise_judge.txt (MT-Bench's pairwise prompt) once with model A's answer first and once
with model B's first. Each verdict is translated back to the models; a win needs both orders to
prefer the same model, anything else (a disagreement, a judged tie, an unparsable verdict, a prompt
too long for the judge's context) is a tie. A judge that always picks the first answer therefore
produces only ties: position bias cancels instead of deciding the match.

`parse_verdict` is strict: the judgment must contain "[[A]]", "[[B]]" or "[[C]]" (tie), and only one
of them (repeated is fine); a judgment naming two different verdicts, or none, is unparsable,
counted, and a tie.
"""
from __future__ import annotations

import re
from pathlib import Path

from engine.distributed import Dist
from engine.sampler import SamplingParams

from .eval import head_to_head
from .generation import generate_records
from .prompts import chat_ids
from .records import stable_seed

INSTRUCTION_SLOT, A_SLOT, B_SLOT = "<INSTRUCTION_HERE>", "<RESPONSE_A_HERE>", "<RESPONSE_B_HERE>"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
_VERDICT_RE = re.compile(r"\[\[([ABC])\]\]")
ORDERS = ("ab", "ba")  # "ab": model A's answer shown first


def parse_verdict(text: str | None) -> str | None:
    """"A", "B", "C" (tie) or None: exactly one distinct [[X]] marker in the judgment."""
    found = set(_VERDICT_RE.findall(text or ""))
    return found.pop() if len(found) == 1 else None


def load_pairwise_template(name: str | Path) -> str:
    """A template file in loop/templates or a path; it must hold all three slots."""
    path = Path(name) if Path(name).is_file() else TEMPLATES_DIR / str(name)
    text = path.read_text(encoding="utf-8")
    for slot in (INSTRUCTION_SLOT, A_SLOT, B_SLOT):
        if slot not in text:
            raise ValueError(f"{path}:1: pairwise judge template has no {slot} slot")
    return text.rstrip("\n")


def fill_pairwise(template: str, instruction: str, first: str, second: str) -> str:
    # One pass, so text that itself contains a slot name is never substituted into.
    values = {INSTRUCTION_SLOT: instruction, A_SLOT: first, B_SLOT: second}
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], template)


def verdict_sign(verdict: str | None, order: str) -> int:
    """+1: model A preferred, -1: model B, 0: tie or unparsable; order says which was shown first."""
    if verdict not in ("A", "B"):
        return 0
    first_wins = verdict == "A"
    return 1 if first_wins == (order == "ab") else -1


def match_summary(records: list[dict], prompt_ids: list[str]) -> dict:
    """win/tie/loss (% of prompts, model A's view) from the judgment records of one match, both orders."""
    by = {(r["prompt_id"], r["order"]): r for r in records}
    ab = [verdict_sign(by[p, "ab"]["verdict"], "ab") for p in prompt_ids]
    ba = [verdict_sign(by[p, "ba"]["verdict"], "ba") for p in prompt_ids]
    out = head_to_head(ab, ba)
    parsed = [r["verdict"] for r in records if r["verdict"] is not None]
    out.update({
        "judgments": len(records),
        "unparsable": sum(r["verdict"] is None and not r.get("skipped") for r in records),
        "too_long": sum(bool(r.get("skipped")) for r in records),
        "inconsistent": sum(1 for a, b in zip(ab, ba) if a != b),  # the two orders disagree
        # Share of parsed decisive verdicts that picked the first answer: 0.5 = no position bias.
        "first_position_rate": (sum(v == "A" for v in parsed) / sum(v in "AB" for v in parsed)
                                if any(v in "AB" for v in parsed) else None),
    })
    return out


def judge_match(sampler, tok, dist: Dist, *, template: str, prompts: list[dict], answers_a: dict[str, str],
                answers_b: dict[str, str], out_path: Path, run_seed: int, stage: str, temperature: float,
                top_p: float, max_new_tokens: int, chunk_size: int) -> list[dict]:
    """Judge every prompt {"id", "prompt"} answered by both models, in both orders, into out_path
    (resumable, as every generation). Records: {"id", "prompt_id", "order", "text", "num_tokens",
    "finish_reason", "verdict"}, plus "skipped": "too_long" when the prompt does not fit the judge."""
    max_len = sampler.model.config.max_seq_len
    requests, skipped = [], []
    for p in prompts:
        for order in ORDERS:
            first, second = (answers_a, answers_b) if order == "ab" else (answers_b, answers_a)
            ids = chat_ids(tok, fill_pairwise(template, p["prompt"], first[p["id"]], second[p["id"]]))
            rid = f"{p['id']}-{order}"
            base = {"id": rid, "prompt_id": p["id"], "order": order}
            if len(ids) + max_new_tokens > max_len:  # as loop/generation.py skips it
                skipped.append({**base, "text": "", "num_tokens": 0, "finish_reason": "skipped", "verdict": None,
                                "skipped": "too_long"})
                continue
            requests.append({**base, "ids": ids, "seed": stable_seed(run_seed, stage, rid)})
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            stop_token_ids=tuple(tok.stop_ids))

    def record(req, c, rid):
        return {"id": rid, "prompt_id": req["prompt_id"], "order": req["order"], "text": c.text,
                "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason, "verdict": parse_verdict(c.text)}

    judged = generate_records(sampler, dist, requests, params, out_path, chunk_size=chunk_size, make_record=record,
                              desc=stage)
    if not dist.is_main:
        return []
    by_id = {r["id"]: r for r in judged + skipped}
    return [by_id[f"{p['id']}-{o}"] for p in prompts for o in ORDERS]
