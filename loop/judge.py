"""The LLM-as-a-judge: its prompt, its score parser, judging records with a sampler, grouping the scores.

`parse_score` takes the LAST "Score: <n>" in a judgment (case-insensitive; ASCII ":" or the
full-width "：" that CJK-trained models emit; integer or decimal; optional "/5" or "out of 5"
after it) and accepts it only in 0..5. Anything else is None: an unparsable judgment is counted
as "no score" and never becomes a number that could silently turn a response into a rejected one.
"""
from __future__ import annotations

import re
from pathlib import Path

from engine.distributed import Dist
from engine.sampler import SamplingParams

from .config import LoopConfig
from .generation import generate_records
from .prompts import chat_ids
from .records import stable_seed

INSTRUCTION_SLOT = "<INSTRUCTION_HERE>"
RESPONSE_SLOT = "<RESPONSE_HERE>"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
PAPER_TEMPLATE = TEMPLATES_DIR / "judge_paper.txt"

# "Score" then a colon, then a number. The number must not run into more digits or letters
# ("Score: 4abc" is not a score); a trailing "." that ends a sentence is allowed.
_SCORE_RE = re.compile(r"score\s*[:：]\s*\**\s*([+-]?\d+(?:\.\d+)?)(?![\d]|\.\d|[A-Za-z])", re.IGNORECASE)
_SCORE_WORD_RE = re.compile(r"score\s*[:：]", re.IGNORECASE)


def parse_score(text: str, max_score: float = 5.0) -> float | None:
    """The last "Score: <n>" in `text` if it is a number in [0, max_score], else None.

    "Last" is the last "Score:" marker, not the last one that happens to parse: a judgment that
    ends "Score: 4 ... Score: ten" concluded with no usable score, so it is None.
    """
    if not text:
        return None
    markers = list(_SCORE_WORD_RE.finditer(text))
    if not markers:
        return None
    last = markers[-1]
    m = _SCORE_RE.match(text, last.start())
    if m is None:
        return None
    value = float(m.group(1))
    if not 0.0 <= value <= max_score:
        return None
    return value


def template_path(name: str, world) -> Path:
    """judge.template's file: "paper" (Figure 2), "world" (the world's own; world: a loop.world.World) or a path."""
    return PAPER_TEMPLATE if name == "paper" else world.judge_template_path if name == "world" else Path(name)


def load_template(path: str | Path) -> str:
    """Read a judge template and check it has both slots (a template without them judges nothing)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    for slot in (INSTRUCTION_SLOT, RESPONSE_SLOT):
        if slot not in text:
            raise ValueError(f"{path}:1: judge template has no {slot} slot")
    return text.rstrip("\n")


def fill_template(template: str, instruction: str, response: str) -> str:
    # One pass, so an instruction that itself contains "<RESPONSE_HERE>" cannot be substituted into.
    return re.sub(
        f"{re.escape(INSTRUCTION_SLOT)}|{re.escape(RESPONSE_SLOT)}",
        lambda m: instruction if m.group(0) == INSTRUCTION_SLOT else response,
        template,
    )


def mean_score(scores: list[float | None]) -> float | None:
    valid = [s for s in scores if s is not None]
    return sum(valid) / len(valid) if valid else None


def judge_records(sampler, tok, dist: Dist, cfg: LoopConfig, *, template: str, items: list[dict], out_path: Path,
                  k: int, temperature: float, top_p: float, stage: str, chunk_hook=None) -> list[dict]:
    """Judge items {"id", "prompt", "response"} k times each; records carry the raw text and the score.

    sampled (the paper): score = parse_score(text), None when unparsable. expected: the justification
    stops at "Score:", and the score is E[score token] under the judge (loop/expected_score.py)."""
    jc = cfg.judge
    requests = [{"id": it["id"], "ids": chat_ids(tok, fill_template(template, it["prompt"], it["response"])),
                 "seed": stable_seed(cfg.run.seed, stage, it["id"])} for it in items]
    expected = jc.mode == "expected"
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=jc.max_new_tokens, n=k,
                            stop_token_ids=tuple(tok.stop_ids), stop=("Score:",) if expected else ())

    def record(req, c, rid):
        rec = {"id": rid, "target_id": req["id"], "sample_index": c.sample_index, "text": c.text,
               "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
        rec["score"] = None if expected else parse_score(c.text)
        return rec

    finalize = None
    if expected:
        from .expected_score import expected_scores, score_token_ids

        prefix, score_ids = score_token_ids(tok)
        max_len = sampler.model.config.max_seq_len

        def finalize(made):
            seqs = []
            for req, rec in made:
                body = tok.encode(rec["text"].rstrip() + " ", bos=False) if rec["text"].strip() else []
                room = max_len - len(req["ids"]) - len(prefix)
                seqs.append((req["ids"] + body[:max(0, room)] + prefix)[-max_len:])
            for (_, rec), res in zip(made, expected_scores(sampler.model, seqs, score_ids)):
                rec["score"], rec["score_mass"] = res["expected"], res["mass"]
                rec["score_mode"] = "expected"

    return generate_records(sampler, dist, requests, params, out_path, chunk_size=cfg.run.chunk_size,
                            make_record=record, desc=stage, finalize=finalize, chunk_hook=chunk_hook)


def scores_by_target(judgments: list[dict]) -> dict[str, list[float | None]]:
    """target id -> its judgments' scores in judgment order (None kept: unparsable)."""
    by_target: dict[str, list] = {}
    for j in judgments:
        by_target.setdefault(j["target_id"], []).append(j["score"])
    return by_target


def mean_scores(judgments: list[dict]) -> dict[str, float | None]:
    """target id -> mean of its parsable scores (None when none parsed)."""
    return {t: mean_score(s) for t, s in scores_by_target(judgments).items()}
