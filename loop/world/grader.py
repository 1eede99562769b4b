"""The world's ground-truth grader: the paper's additive 0-5 scale, computed by program.

Used ONLY to write seed data (IFT answers, EFT judgments) and to evaluate; never as the reward in
AI-feedback training. `grader_unavailable()` turns every `grade()` call into an error, so a test can
prove that the AIFT stages never consult it.

Score = number of ordered checks passed before the first failure (see tasks.run_checks):
  1 gives numbers (relevant), 2 the number of answers asked for (substantial part),
  3 each answer follows the task's rule (basic elements), 4 the goal is met (direct answer),
  5 nothing but the answer (concise). The justification spells out each check it ran.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from .tasks import Task, parse_task, run_checks


class GraderUnavailable(RuntimeError):
    """Raised by grade() while the ground truth is switched off (AIFT must never need it)."""


@dataclass(frozen=True)
class Grade:
    score: float
    correct: bool  # fully correct and concise (score 5)
    justification: str


_state = threading.local()


def is_available() -> bool:
    return getattr(_state, "disabled", 0) == 0


@contextlib.contextmanager
def grader_unavailable():
    """Within this block every grade() call raises GraderUnavailable (this thread)."""
    _state.disabled = getattr(_state, "disabled", 0) + 1
    try:
        yield
    finally:
        _state.disabled -= 1


def justification_for(task: Task, response: str) -> tuple[int, str]:
    checks = run_checks(task, response)
    score = 0
    for c in checks:
        if not c.passed:
            break
        score += 1
    body = " ".join(f"{c.phrase}: {'yes' if c.passed else 'no'}." for c in checks)
    return score, f"{body} Score: {score}"


def grade_task(task: Task, response: str) -> Grade:
    if not is_available():
        raise GraderUnavailable("loop/world/grader.py: the ground-truth grader is unavailable here (AIFT stage?)")
    score, text = justification_for(task, response)
    return Grade(score=float(score), correct=score == 5, justification=text)


def grade(instruction: str, response: str) -> Grade:
    """Ground-truth 0-5 grade of a response to one of the world's instructions."""
    if not is_available():
        raise GraderUnavailable("loop/world/grader.py: the ground-truth grader is unavailable here (AIFT stage?)")
    task = parse_task(instruction)
    if task is None:
        raise ValueError(f"loop/world/grader.py: not an instruction of this world: {instruction[:80]!r}")
    return grade_task(task, response)
