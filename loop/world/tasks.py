"""The world's task families: templated instructions with many valid answers and a one-step check.

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
from dataclasses import dataclass

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}
_NUM = r"(\d{1,2})"
_LIST = r"(\d{1,2}(?: \d{1,2}){2,5})"


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


def _compile(templates, slots):
    """Turn display templates into strict regexes (whitespace-normalized, case-insensitive)."""
    out = []
    for tpl in templates:
        rx = re.escape(tpl)
        for slot, sub in slots.items():
            rx = rx.replace(re.escape("{" + slot + "}"), sub)
        out.append(re.compile(rx, re.IGNORECASE))
    return tuple(out)


def _fmt(items) -> str:
    return " ".join(str(x) for x in items)


class SumDigits(Family):
    """"Give three digits that sum to 14." -> "5 9 0"."""

    name = "sum_digits"
    templates = (
        "Give {k} digits that sum to {t}.",
        "Write {k} digits whose sum is {t}.",
        "Name {k} digits that add up to {t}.",
        "List {k} digits with a sum of {t}.",
    )
    patterns = _compile(templates, {"k": r"(two|three)", "t": _NUM})

    def sample_params(self, rng):
        k = rng.choice((2, 3))
        return (k, rng.randint(1, 9 * k - 2))

    def render_slots(self, params):
        return {"k": NUMBER_WORDS[params[0]], "t": params[1]}

    def params_from_match(self, m):
        return (_WORD_NUMBERS[m.group(1).lower()], int(m.group(2)))

    def count(self, params):
        return params[0]

    def items_ok(self, params, items):
        return all(0 <= x <= 9 for x in items), f"{_fmt(items)} digits"

    def goal_ok(self, params, items):
        s = sum(items)
        return s == params[1], f"{' + '.join(map(str, items))} = {s} , target {params[1]}"

    def solutions(self, params):
        k, t = params
        if k == 2:
            return [(a, t - a) for a in range(10) if 0 <= t - a <= 9]
        return [(a, b, t - a - b) for a in range(10) for b in range(10) if 0 <= t - a - b <= 9]

    def near_miss_pool(self, params):
        return list(range(0, 13))


class PickPair(Family):
    """"Pick two numbers from 3 8 5 1 that sum to 9." -> "8 1"."""

    name = "pick_pair"
    templates = (
        "Pick two numbers from {L} that sum to {t}.",
        "From {L} , choose two numbers whose sum is {t}.",
        "Which two numbers in {L} add up to {t}?",
    )
    patterns = _compile(templates, {"L": _LIST, "t": _NUM})

    def sample_params(self, rng):
        nums = rng.sample(range(1, 10), rng.choice((4, 5)))
        a, b = rng.sample(nums, 2)
        return (tuple(nums), a + b)

    def render_slots(self, params):
        return {"L": _fmt(params[0]), "t": params[1]}

    def params_from_match(self, m):
        nums = tuple(int(x) for x in m.group(1).split())
        return (nums, int(m.group(2))) if len(set(nums)) == len(nums) else None

    def count(self, params):
        return 2

    def items_ok(self, params, items):
        ok = all(x in params[0] for x in items) and len(set(items)) == len(items)
        return ok, f"{_fmt(items)} in list"

    def goal_ok(self, params, items):
        s = sum(items)
        return s == params[1], f"{' + '.join(map(str, items))} = {s} , target {params[1]}"

    def solutions(self, params):
        nums, t = params
        return [(a, b) for a in nums for b in nums if a != b and a + b == t]

    def near_miss_pool(self, params):
        return sorted(set(params[0]) | {x + d for x in params[0] for d in (-1, 1)} - {0})


class ParityBetween(Family):
    """"Name an even number between 12 and 30." -> "18"."""

    name = "parity_between"
    templates = (
        "Name an {p} number between {a} and {b}.",
        "Give an {p} number greater than {a} and less than {b}.",
        "Write an {p} number that is between {a} and {b}.",
    )
    patterns = _compile(templates, {"p": r"(even|odd)", "a": _NUM, "b": _NUM})

    def sample_params(self, rng):
        a = rng.randint(1, 45)
        return (rng.choice(("even", "odd")), a, a + rng.randint(3, 14))

    def render_slots(self, params):
        return {"p": params[0], "a": params[1], "b": params[2]}

    def params_from_match(self, m):
        return (m.group(1).lower(), int(m.group(2)), int(m.group(3)))

    def count(self, params):
        return 1

    def items_ok(self, params, items):
        _, a, b = params
        return all(a < x < b for x in items), " , ".join(f"{a} < {x} < {b}" for x in items)

    def goal_ok(self, params, items):
        want = 0 if params[0] == "even" else 1
        x = items[0]
        return x % 2 == want, f"{x} is {params[0]}"

    def solutions(self, params):
        p, a, b = params
        want = 0 if p == "even" else 1
        return [(x,) for x in range(a + 1, b) if x % 2 == want]

    def near_miss_pool(self, params):
        return list(range(max(0, params[1] - 2), params[2] + 3))


class PickCompared(Family):
    """"Name a number from 14 37 22 9 that is bigger than 20." -> "37"."""

    name = "pick_compared"
    templates = (
        "Name a number from {L} that is {d} than {x}.",
        "Which number in {L} is {d} than {x}?",
        "Pick a number from {L} that is {d} than {x}.",
    )
    patterns = _compile(templates, {"L": _LIST, "d": r"(bigger|smaller)", "x": _NUM})

    def sample_params(self, rng):
        while True:
            nums = sorted(rng.sample(range(10, 60), 4))
            cut = rng.randint(1, 3)  # threshold strictly between two neighbours: right and wrong picks exist
            lo, hi = nums[cut - 1], nums[cut]
            if hi - lo >= 2:
                break
        x = rng.randint(lo + 1, hi - 1)
        rng.shuffle(nums)
        return (tuple(nums), rng.choice(("bigger", "smaller")), x)

    def render_slots(self, params):
        return {"L": _fmt(params[0]), "d": params[1], "x": params[2]}

    def params_from_match(self, m):
        nums = tuple(int(x) for x in m.group(1).split())
        return (nums, m.group(2).lower(), int(m.group(3))) if len(set(nums)) == len(nums) else None

    def count(self, params):
        return 1

    def items_ok(self, params, items):
        return all(x in params[0] for x in items), f"{_fmt(items)} in list"

    def goal_ok(self, params, items):
        _, d, x = params
        y = items[0]
        return (y > x if d == "bigger" else y < x), f"{y} {'>' if d == 'bigger' else '<'} {x}"

    def solutions(self, params):
        nums, d, x = params
        return [(y,) for y in nums if (y > x if d == "bigger" else y < x)]

    def near_miss_pool(self, params):
        nums, _, x = params
        return sorted(set(nums) | {x - 1, x, x + 1} | {n + d for n in nums for d in (-1, 1)})


LABELS = ("red", "blue", "green")
_LABEL_WORDS = "|".join(LABELS)
_LABEL = f"(?:{_LABEL_WORDS})"
_LABELED_LIST = rf"(?P<L>\d{{1,2}} {_LABEL}(?: , \d{{1,2}} {_LABEL}){{3,4}})"


class PickLabeled(Family):
    """"From 12 red , 31 blue , 7 red , 25 green , name a red number." -> "12".

    Answering searches the list for the label and takes the number before it; checking looks the
    answer up and reads the label after it ("31 blue , want red"). The lookup is a copy from
    context and the verdict compares two of three label words, a different and easier computation
    than the search, so a judge could catch the errors its own generator makes. At 0.89M parameters
    and 3,000 pretraining steps it does not learn the lookup (bench/RESULTS.md, 2026-12-04)."""

    name = "pick_labeled"
    templates = (
        "From {L} , name a {c} number.",
        "Which number in {L} is {c}?",
        "Pick a {c} number from {L}.",
    )
    # named groups: the templates put the label before or after the list
    patterns = _compile(templates, {"L": _LABELED_LIST, "c": f"(?P<c>{_LABEL_WORDS})"})

    def sample_params(self, rng):
        n = rng.choice((4, 5))
        nums = rng.sample(range(10, 60), n)
        target = rng.choice(LABELS)
        others = [c for c in LABELS if c != target]
        n_target = rng.choice((1, 2))
        labels = [target] * n_target + [rng.choice(others) for _ in range(n - n_target)]
        rng.shuffle(labels)
        return (tuple(zip(nums, labels)), target)

    def render_slots(self, params):
        return {"L": " , ".join(f"{x} {c}" for x, c in params[0]), "c": params[1]}

    def params_from_match(self, m):
        words = m.group("L").replace(",", " ").split()
        pairs = tuple((int(words[i]), words[i + 1].lower()) for i in range(0, len(words), 2))
        return (pairs, m.group("c").lower()) if len({x for x, _ in pairs}) == len(pairs) else None

    def count(self, params):
        return 1

    def items_ok(self, params, items):
        nums = {x for x, _ in params[0]}
        return all(x in nums for x in items), f"{_fmt(items)} in list"

    def goal_ok(self, params, items):
        # the label right after the number, as the list writes it: reading it is one induction step
        # (find the earlier "31", copy what followed), the shortest lookup a small transformer learns
        label = dict(params[0])[items[0]]
        return label == params[1], f"{items[0]} {label} , want {params[1]}"

    def solutions(self, params):
        return [(x,) for x, c in params[0] if c == params[1]]

    def near_miss_pool(self, params):
        nums = [x for x, _ in params[0]]
        return sorted(set(nums) | {n + d for n in nums for d in (-1, 1)})

    def drill(self, rng):
        # every item of a list looked up, in random order, with no asked label in context to copy instead
        # (reviews let "the answer's label is the asked label" pass most of the time); on one line, ". " apart
        # as a review writes checks: a number that starts a line is another piece ("31") than the list's (" 31")
        pairs, _ = self.sample_params(rng)
        lookups = ". ".join(f"{x} {c}" for x, c in rng.sample(pairs, len(pairs)))
        return f"List: {self.render_slots((pairs, ''))['L']}\nLookups: {lookups}."


class PickMissing(Family):
    """"Name a number from 12 31 7 25 that is not in 7 40 12 33." -> "31".

    Answering needs a set difference over two lists; checking one answer is one membership test
    ("31 not in second list"), a lookup where the generator has to search."""

    name = "pick_missing"
    templates = (
        "Name a number from {A} that is not in {B}.",
        "Which number in {A} is missing from {B}?",
        "Pick a number from {A} that {B} does not have.",
    )
    patterns = _compile(templates, {"A": _LIST, "B": _LIST})

    def sample_params(self, rng):
        a = rng.sample(range(10, 60), 4)
        shared = rng.sample(a, rng.choice((2, 3)))
        rest = [x for x in range(10, 60) if x not in a]
        b = shared + rng.sample(rest, 4 - len(shared))
        rng.shuffle(b)
        return (tuple(a), tuple(b))

    def render_slots(self, params):
        return {"A": _fmt(params[0]), "B": _fmt(params[1])}

    def params_from_match(self, m):
        a = tuple(int(x) for x in m.group(1).split())
        b = tuple(int(x) for x in m.group(2).split())
        return (a, b) if len(set(a)) == len(a) else None

    def count(self, params):
        return 1

    def items_ok(self, params, items):
        return all(x in params[0] for x in items), f"{_fmt(items)} in first list"

    def goal_ok(self, params, items):
        return items[0] not in params[1], f"{items[0]} not in second list"

    def solutions(self, params):
        return [(x,) for x in params[0] if x not in params[1]]

    def near_miss_pool(self, params):
        return sorted(set(params[0]) | set(params[1]) | {n + d for n in params[0] for d in (-1, 1)})

    def drill(self, rng):
        a, b = self.sample_params(rng)
        checks = ". ".join(f"{x} not in second list: {'yes' if x not in b else 'no'}" for x in rng.sample(a, len(a)))
        return f"First list: {_fmt(a)}\nSecond list: {_fmt(b)}\nChecks: {checks}."


FAMILIES: dict[str, Family] = {f.name: f for f in (SumDigits(), PickPair(), ParityBetween(), PickCompared(),
                                                   PickLabeled(), PickMissing())}
# The families of the default world (WorldConfig.families); the others are options.
DEFAULT_FAMILIES = ("sum_digits", "pick_pair", "parity_between", "pick_compared")


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
    return _fmt(items)
