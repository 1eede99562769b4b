"""The world's tasks: parsing, sampling and the ordered checks, over the families in loop/world/families/.

Every task asks for a short list of whole numbers. Producing an answer means satisfying several
constraints at once (pick two numbers of a list that hit a target sum); checking one means running
each constraint alone (is it in the list? does a + b equal the target?). That is the generator-
verifier gap the self-judging loop can exploit. The checks are ordered and nested (see `run_checks`):
the ground-truth score is the number of checks passed before the first failure, so a short formulaic
justification spells out exactly what the grader verified.

Numbers are written with spaces around operators ("5 + 9 = 14") so the tokenizer sees the same number
pieces everywhere.
"""
from __future__ import annotations

import random
import re

from .families import DEFAULT_FAMILIES, FAMILIES, LABELS
from .families.base import NUMBER_WORDS, Check, Family, Task, fmt_items

__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "LABELS", "NUMBER_WORDS", "Check", "Family", "Task", "format_answer",
           "parse_task", "run_checks", "sample_task"]


def parse_task(text: str, families: tuple[str, ...] | None = None) -> Task | None:
    """The world task an instruction states, or None when it is no solvable instruction of this world
    (of `families`, default all)."""
    if not isinstance(text, str) or len(text) > 200:
        return None
    for name in families or FAMILIES:
        task = FAMILIES[name].parse(text.strip())
        if task is not None:
            return task
    return None


def sample_task(rng: random.Random, families: tuple[str, ...] | None = None) -> Task:
    name = rng.choice(families or DEFAULT_FAMILIES)
    return FAMILIES[name].sample(rng)


_ANSWER_RE = re.compile(r"\d+(?: \d+)*")


def run_checks(task: Task, response: str) -> list[Check]:
    """The ordered checks, up to and including the first one that fails.

    Order: gives numbers, right count, each item follows the rule, goal met, only the answer."""
    family = FAMILIES[task.family]
    items = [int(x) for x in re.findall(r"\d+", response)]
    checks = [Check("numbers", bool(items), "numbers")]
    if not items:
        return checks
    k = family.count(task.params)
    checks.append(Check("count", len(items) == k, f"count {k}"))
    if len(items) != k:
        return checks
    ok, phrase = family.items_ok(task.params, items)
    checks.append(Check("items", ok, phrase))
    if not ok:
        return checks
    ok, phrase = family.goal_ok(task.params, items)
    checks.append(Check("goal", ok, phrase))
    if not ok:
        return checks
    checks.append(Check("format", bool(_ANSWER_RE.fullmatch(response.strip())), "only answer"))
    return checks


def format_answer(items) -> str:
    return fmt_items(items)
