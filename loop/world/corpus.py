"""The world's pretraining corpus: the text a base model of this world would have read.

Four kinds of documents (seven with CorpusMix.copy, .checks and .lookups), drawn from the same task families as the seed data
but never from the seed instructions themselves: tasks with answers ("Task: ... Answer: ..."), reviews of answers
that spell out the checks ("Task / Response / Review: ... Score: k"), plain facts ("5 + 9 = 14",
"12 < 18 < 30", "18 is even") and lists of tasks (what self-instruct prompting continues). M0 thus
knows the world's facts and formats, but not the chat template nor the judge rubric: those come
from IFT and EFT.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .grader import justification_for
from .seed import candidates_by_score, correct_response
from .tasks import DEFAULT_FAMILIES, FAMILIES, Family, run_checks, sample_task


@dataclass(frozen=True)
class CorpusMix:
    """Relative weights of the document kinds."""

    qa: float = 0.45
    review: float = 0.25
    facts: float = 0.15
    task_list: float = 0.15
    # Number lists written twice ("Numbers: 21 39 12\nAgain: 21 39 12"): pure in-context copying, the
    # skill every check of a review needs ("33 in list"). 0 (the default) leaves the corpus unchanged.
    copy: float = 0.0
    # One check of a review on its own, true or false half the time each ("Check: 45 < 47 < 54: no"): the
    # verdict step the judge gets wrong (bench/RESULTS.md, copy probe: 83% per check, 75% = always "yes").
    # Reviews pass checks far more often than they fail them, and the facts are all true. 0: unchanged.
    checks: float = 0.0
    # Families' lookup drills (Family.drill: "List: 12 red , 31 blue\nLookups: 31 blue. 12 red."): the lookup
    # a lookup family's check needs, with no asked label to copy instead. 0, or no family with drills: unchanged.
    lookups: float = 0.0


def _qa_doc(rng: random.Random, forbidden: set[str], families) -> str:
    lines = []
    for _ in range(rng.randint(1, 3)):
        task = _fresh_task(rng, forbidden, families)
        lines.append(f"Task: {task.text}\nAnswer: {correct_response(task, rng)}")
    return "\n\n".join(lines)


def _review_doc(rng: random.Random, forbidden: set[str], families) -> str:
    task = _fresh_task(rng, forbidden, families)
    by_score = candidates_by_score(task, rng, tries=6)
    score = rng.choice(sorted(by_score))
    response = rng.choice(by_score[score])
    _, text = justification_for(task, response)
    return f"Task: {task.text}\nResponse: {response}\nReview: {text}"


def _fact_line(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        a, b, c = (rng.randint(0, 9) for _ in range(3))
        return f"{a} + {b} + {c} = {a + b + c}"
    if kind == 2:
        x = rng.randint(0, 60)
        return f"{x} is {'even' if x % 2 == 0 else 'odd'}"
    if kind == 3:
        x, y = rng.sample(range(0, 61), 2)
        return f"{x} {'<' if x < y else '>'} {y}"
    a = rng.randint(0, 45)
    b = a + rng.randint(2, 14)
    x = rng.randint(a + 1, b - 1)
    return f"{a} < {x} < {b}"


def _copy_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 3)):
        xs = " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 8)))
        lines.append(f"Numbers: {xs}\nAgain: {xs}")
    return "\n".join(lines)


def _check_doc(rng: random.Random, forbidden: set[str], families) -> str:
    """1-3 tasks, each with a response and one check of it: the items rule or the goal, failed or passed
    with even odds (responses drawn from the graded candidates that fail or pass exactly that check)."""
    parts = []
    for _ in range(rng.randint(1, 3)):
        task = _fresh_task(rng, forbidden, families)
        by_score = candidates_by_score(task, rng, tries=6)
        # score 2 = the items check failed, 3 = items passed and the goal failed, >= 4 = both passed
        check = rng.choice(("items", "goal"))
        fail, passed = ([2], [3, 4, 5]) if check == "items" else ([3], [4, 5])
        levels = [s for s in (fail if rng.random() < 0.5 else passed) if by_score.get(s)]
        if not levels:
            continue
        response = rng.choice(by_score[rng.choice(levels)])
        c = run_checks(task, response)[2 if check == "items" else 3]  # the grader's own check, as reviews spell it
        parts.append(f"Task: {task.text}\nResponse: {response}\nCheck: {c.phrase}: {'yes' if c.passed else 'no'}")
    return "\n\n".join(parts) or _facts_doc(rng)


def _facts_doc(rng: random.Random) -> str:
    return "\n".join(_fact_line(rng) for _ in range(rng.randint(4, 8)))


def _task_list_doc(rng: random.Random, forbidden: set[str], families) -> str:
    # Exactly the shape of loop/templates/self_instruct_world.txt, so the model continues such a list
    # with one new task (self-instruct prompting of a base model), up to the 9th item the loop asks for.
    tasks = [_fresh_task(rng, forbidden, families).text for _ in range(rng.randint(3, 9))]
    return "Tasks:\n" + "\n".join(f"Task {i + 1}: {t}" for i, t in enumerate(tasks))


def _fresh_task(rng: random.Random, forbidden: set[str], families):
    while True:
        task = sample_task(rng, families)
        if task.text not in forbidden:
            return task


def corpus_documents(seed: int, n_docs: int, forbidden: set[str], mix: CorpusMix = CorpusMix(),
                     families: tuple[str, ...] | None = None) -> list[str]:
    """`n_docs` documents, deterministic for `seed`; no seed instruction (`forbidden`) appears; tasks of
    `families` (default: the default world's)."""
    rng = random.Random(f"world-corpus-{seed}")
    # "copy", "checks" and "lookups" last: at weight 0 never drawn, and the other kinds' draws are unchanged
    kinds = ("qa", "review", "facts", "task_list", "copy", "checks", "lookups")
    drills = [FAMILIES[f] for f in (families or DEFAULT_FAMILIES) if type(FAMILIES[f]).drill is not Family.drill]
    weights = [getattr(mix, k) for k in kinds]
    docs = []
    for _ in range(n_docs):
        kind = rng.choices(kinds, weights)[0]
        if kind == "qa":
            docs.append(_qa_doc(rng, forbidden, families))
        elif kind == "review":
            docs.append(_review_doc(rng, forbidden, families))
        elif kind == "facts":
            docs.append(_facts_doc(rng))
        elif kind == "copy":
            docs.append(_copy_doc(rng))
        elif kind == "checks":
            docs.append(_check_doc(rng, forbidden, families))
        elif kind == "lookups":
            docs.append(rng.choice(drills).drill(rng) if drills else _facts_doc(rng))
        else:
            docs.append(_task_list_doc(rng, forbidden, families))
    return docs
