"""What every task family is made of: the Task and Check records, the Family interface and the template
helpers. Hashed into every world M0's recipe key (loop/world/m0.py), as the family modules a world uses are.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}
NUM_RX = r"(\d{1,2})"
LIST_RX = r"(\d{1,2}(?: \d{1,2}){2,5})"


@dataclass(frozen=True)
class Task:
    """One instruction of the world: its family, parsed parameters and rendered text."""

    family: str
    params: tuple
    text: str


@dataclass(frozen=True)
class Check:
    """One ordered check of a response: whether it passed and the phrase the justification uses."""

    name: str
    passed: bool
    phrase: str


class Family:
    """A task family: how to sample, render, parse, solve and check its instructions."""

    name = ""
    templates: tuple[str, ...] = ()
    patterns: tuple[re.Pattern, ...] = ()

    # Each family implements these; `items_ok` / `goal_ok` return (passed, phrase for the justification).
    def sample_params(self, rng: random.Random) -> tuple:
        raise NotImplementedError

    def render_slots(self, params: tuple) -> dict:
        raise NotImplementedError

    def params_from_match(self, m: re.Match) -> tuple | None:
        raise NotImplementedError

    def count(self, params: tuple) -> int:
        raise NotImplementedError

    def items_ok(self, params: tuple, items: list[int]) -> tuple[bool, str]:
        raise NotImplementedError

    def goal_ok(self, params: tuple, items: list[int]) -> tuple[bool, str]:
        raise NotImplementedError

    def solutions(self, params: tuple) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def near_miss_pool(self, params: tuple) -> list[int]:
        """Numbers a near-miss answer draws from (seed.py): the valid ones plus their off-by-one neighbours."""
        raise NotImplementedError

    def drill(self, rng: random.Random) -> str | None:
        """A pretraining document of this family's lookups in the review's own phrases, or None."""
        return None

    def sample(self, rng: random.Random) -> Task:
        params = self.sample_params(rng)
        template = rng.choice(self.templates)
        return Task(self.name, params, template.format(**self.render_slots(params)))

    def parse(self, text: str) -> Task | None:
        t = " ".join(text.split())
        for pattern in self.patterns:
            m = pattern.fullmatch(t)
            if m:
                params = self.params_from_match(m)
                if params is not None and self.solutions(params):
                    return Task(self.name, params, t)
        return None


def compile_templates(templates, slots):
    """Turn display templates into strict regexes (whitespace-normalized, case-insensitive)."""
    out = []
    for tpl in templates:
        rx = re.escape(tpl)
        for slot, sub in slots.items():
            rx = rx.replace(re.escape("{" + slot + "}"), sub)
        out.append(re.compile(rx, re.IGNORECASE))
    return tuple(out)


def fmt_items(items) -> str:
    return " ".join(str(x) for x in items)
