"""Prompt construction: self-instruct few-shot prompts, post-processing and filtering of new
instructions, and the chat template around everything the model is asked.

Self-instruct (paper sec. 3 / Wang et al. 2023): 8 shots, 6 from IFT and 2 from prompts generated
in earlier iterations (all 8 from IFT while there are none yet). The shots for attempt `a` come
from a seed derived from (run seed, iteration, a), so a resumed stage asks the same questions.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from .records import stable_seed
from .rouge import RougeFilter

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
EXAMPLES_SLOT = "<EXAMPLES_HERE>"
NEXT_SLOT = "<NEXT_HERE>"


def template_path(name: str) -> Path:
    p = Path(name)
    return p if p.is_file() else TEMPLATES_DIR / name


def load_self_instruct_template(name: str) -> str:
    path = template_path(name)
    text = path.read_text(encoding="utf-8")
    if EXAMPLES_SLOT not in text:
        raise ValueError(f"{path}:1: self-instruct template has no {EXAMPLES_SLOT} slot")
    return text.rstrip("\n")


def few_shot_prompt(template: str, shots: list[str]) -> str:
    examples = "\n".join(f"Task {i}: {' '.join(s.split())}" for i, s in enumerate(shots, 1))
    return template.replace(EXAMPLES_SLOT, examples).replace(NEXT_SLOT, str(len(shots) + 1))


def pick_shots(ift_prompts: list[str], generated: list[str], *, n_ift: int, n_generated: int,
               seed: int) -> list[str]:
    rng = random.Random(seed)
    k_gen = min(n_generated, len(generated))
    shots = rng.sample(ift_prompts, min(len(ift_prompts), n_ift + n_generated - k_gen))
    shots += rng.sample(generated, k_gen)
    rng.shuffle(shots)
    return shots


def self_instruct_requests(template: str, ift_prompts: list[str], generated: list[str], *, attempts: int,
                           n_ift: int, n_generated: int, run_seed: int, iteration: int) -> list[dict]:
    """One request per attempt: {"id", "text", "seed"}; ids and shots are stable across processes."""
    out = []
    for a in range(attempts):
        rid = f"it{iteration}-gen{a:06d}"
        shots = pick_shots(ift_prompts, generated, n_ift=n_ift, n_generated=n_generated,
                           seed=stable_seed(run_seed, "shots", rid))
        out.append({"id": rid, "text": few_shot_prompt(template, shots), "seed": stable_seed(run_seed, "gen_prompts", rid)})
    return out


_TASK_PREFIX = re.compile(r"^\s*(?:task\s*\d*\s*[:.)-]|\d+\s*[.):-]|instruction\s*:)\s*", re.IGNORECASE)


def extract_instruction(generation: str) -> str:
    """The first task in a generation: up to the next "Task N:" line or a blank line, prefix removed.

    Later models tend to emit a list of tasks followed by an answer (paper appendix), so only the
    first item counts."""
    text = generation.strip()
    text = _TASK_PREFIX.sub("", text, count=1)
    text = re.split(r"\n\s*(?:task\s*\d+\s*[:.)]|\d+\s*[.)])|\n\s*\n", text, maxsplit=1, flags=re.IGNORECASE)[0]
    return " ".join(text.split())


def filter_instructions(candidates: list[dict], existing: list[str], *, want: int, rouge_threshold: float,
                        min_words: int, max_words: int, banned_keywords: tuple[str, ...],
                        is_valid=None) -> tuple[list[dict], dict]:
    """Keep candidates in order until `want` are kept. candidates: {"id", "instruction"}.

    Returns (kept, reason_counts). A candidate is dropped when empty, too short/long, containing a
    banned keyword (self-instruct's list: things a text model cannot do), rejected by the world's
    `is_valid` (when given), a duplicate, or ROUGE-L > threshold with any existing or kept prompt.
    """
    rouge = RougeFilter(rouge_threshold)
    for text in existing:
        rouge.add(text)
    seen = {" ".join(t.lower().split()) for t in existing}
    kept, reasons = [], {}
    banned = [re.compile(rf"\b{re.escape(k)}\b", re.IGNORECASE) for k in banned_keywords]

    def drop(why):
        reasons[why] = reasons.get(why, 0) + 1

    for c in candidates:
        text = c["instruction"]
        words = len(text.split())
        norm = " ".join(text.lower().split())
        if len(kept) >= want:
            drop("surplus")
        elif not text:
            drop("empty")
        elif words < min_words or words > max_words:
            drop("length")
        elif any(b.search(text) for b in banned):
            drop("keyword")
        elif is_valid is not None and not is_valid(text):
            drop("invalid")
        elif norm in seen:
            drop("duplicate")
        elif rouge.too_similar(text):
            drop("rouge")
        else:
            kept.append(c)
            seen.add(norm)
            rouge.add(text)
    return kept, reasons


def chat_ids(tokenizer, user_text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True)


def response_ids(tokenizer, text: str, finished: bool) -> list[int]:
    """Token ids of an assistant reply as training data: the text, then the turn's end token if it ended."""
    return tokenizer.reply_ids(text, finished)
