"""The LLM-as-a-judge prompt and its score parser.

`parse_score` takes the LAST "Score: <n>" in a judgment (case-insensitive; ASCII ":" or the
full-width "：" that CJK-trained models emit; integer or decimal; optional "/5" or "out of 5"
after it) and accepts it only in 0..5. Anything else is None: an unparsable judgment is counted
as "no score" and never becomes a number that could silently turn a response into a rejected one.
"""
from __future__ import annotations

import re
from pathlib import Path

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
