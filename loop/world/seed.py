"""Seed data of the world: IFT, ranked EFT groups and held-out eval prompts (deterministic per seed).

Wrong responses imitate the errors a small model makes: a sum off by one, a number not in the list,
a bound taken as "between", the wrong parity, one number too many or too few, the right answer
wrapped in extra words or commas, and text with no number at all. Each candidate is labelled by the
ground-truth grader, so every EFT judgment is exactly what the grader wrote.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from common.atomic import atomic_write_text

from .grader import grade_task
from .tasks import FAMILIES, Task, format_answer, sample_task

_VERBOSE = (
    "The answer is {a}.",
    "{a} is my answer.",
    "Sure , {a}",
    "Answer: {a}",
    "{a}.",
    "{c}",
    "{and}",
)
_IRRELEVANT = (
    "I do not know.",
    "Here is the answer.",
    "Yes.",
    "That is easy.",
    "Sure , here it is.",
    "No number fits.",
)
# How often each score level is picked into an EFT group (the model's common outcomes weigh more).
_LEVEL_WEIGHTS = {5: 3.0, 4: 1.5, 3: 3.0, 2: 2.0, 1: 1.0, 0: 0.7}


def _perturb(items: list[int], pool: list[int], rng: random.Random) -> list[int]:
    out = list(items)
    move = rng.random()
    if move < 0.35:
        i = rng.randrange(len(out))
        out[i] += rng.choice((-1, 1))
        out[i] = max(0, out[i])
    elif move < 0.7:
        out[rng.randrange(len(out))] = rng.choice(pool)
    elif move < 0.85 and len(out) > 1:
        out.pop(rng.randrange(len(out)))
    else:
        out.insert(rng.randrange(len(out) + 1), rng.choice(pool))
    return out


def _verbose(items: list[int], rng: random.Random) -> str:
    a = format_answer(items)
    tpl = rng.choice(_VERBOSE)
    if len(items) == 1 and tpl in ("{c}", "{and}"):
        tpl = "{a}."
    return tpl.format(a=a, c=" , ".join(map(str, items)), **{"and": " and ".join(map(str, items))})


def candidates_by_score(task: Task, rng: random.Random, tries: int = 40) -> dict[int, list[str]]:
    """Distinct candidate responses to `task`, grouped by their ground-truth score."""
    family = FAMILIES[task.family]
    solutions = family.solutions(task.params)
    pool = family.near_miss_pool(task.params)
    seen: set[str] = set()
    by_score: dict[int, list[str]] = {}

    def add(text: str):
        if text and text not in seen:
            seen.add(text)
            by_score.setdefault(int(grade_task(task, text).score), []).append(text)

    for _ in range(tries):
        items = list(rng.choice(solutions))
        rng.shuffle(items)
        add(format_answer(items))
        wrong = _perturb(items, pool, rng)
        add(format_answer(wrong))
        if rng.random() < 0.3:
            add(_verbose(wrong, rng))
        if rng.random() < 0.3:
            add(_verbose(items, rng))
    add(rng.choice(_IRRELEVANT))
    return by_score


def correct_response(task: Task, rng: random.Random) -> str:
    items = list(rng.choice(FAMILIES[task.family].solutions(task.params)))
    rng.shuffle(items)
    return format_answer(items)


def eft_group(task: Task, rng: random.Random, size: int) -> list[tuple[str, int]]:
    """`size` responses to one task (distinct texts; mostly distinct scores) with their scores."""
    by_score = candidates_by_score(task, rng)
    levels = [s for s in sorted(by_score) if by_score[s]]
    picked: list[tuple[str, int]] = []
    while len(picked) < size and levels:
        weights = [_LEVEL_WEIGHTS[s] for s in levels]
        s = rng.choices(levels, weights)[0]
        picked.append((by_score[s].pop(rng.randrange(len(by_score[s]))), s))
        # Mostly distinct levels (a ranking to learn), sometimes a tie (as in human rankings).
        if not by_score[s] or rng.random() > 0.15:
            levels.remove(s)
    return picked


def dense_ranks(scores: list[float]) -> list[int]:
    """Rank 0 = best; equal scores share a rank."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def _unique_tasks(rng: random.Random, n: int, seen: set[str], families: tuple[str, ...] | None) -> list[Task]:
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"loop/world/seed.py: cannot draw {n} distinct instructions (world too small)")
        task = sample_task(rng, families)
        if task.text not in seen:
            seen.add(task.text)
            out.append(task)
    return out


def build_seed_records(seed: int, n_ift: int, n_eft_train: int, n_eft_eval: int, n_eval: int,
                       group_size: int, families: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
    """All seed records; splits never share an instruction text."""
    rng = random.Random(f"world-seed-{seed}")
    seen: set[str] = set()
    ift = [{"id": f"ift-{i:05d}", "prompt": t.text, "response": correct_response(t, rng)}
           for i, t in enumerate(_unique_tasks(rng, n_ift, seen, families))]
    out = {"ift": ift}
    for split, n in (("eft_train", n_eft_train), ("eft_eval", n_eft_eval)):
        records = []
        for g, task in enumerate(_unique_tasks(rng, n, seen, families)):
            group = eft_group(task, rng, group_size)
            ranks = dense_ranks([s for _, s in group])
            for j, ((response, score), rank) in enumerate(zip(group, ranks)):
                records.append({
                    "id": f"{split}-{g:05d}-{j}", "group_id": f"{split}-{g:05d}", "prompt": task.text,
                    "response": response, "rank": rank,
                    "judgment": grade_task(task, response).justification, "score": float(score),
                })
        out[split] = records
    out["eval_prompts"] = [{"id": f"eval-{i:05d}", "prompt": t.text}
                           for i, t in enumerate(_unique_tasks(rng, n_eval, seen, families))]
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Atomic JSONL write: a reader never sees a half-written file."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
