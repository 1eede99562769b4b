"""The lookup families (issue #13): checks that are one lookup or one membership test, not the answer's search."""
from __future__ import annotations

from .base import LIST_RX, Family, compile_templates, fmt_items

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
    patterns = compile_templates(templates, {"L": _LABELED_LIST, "c": f"(?P<c>{_LABEL_WORDS})"})

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
        return all(x in nums for x in items), f"{fmt_items(items)} in list"

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
    patterns = compile_templates(templates, {"A": LIST_RX, "B": LIST_RX})

    def sample_params(self, rng):
        a = rng.sample(range(10, 60), 4)
        shared = rng.sample(a, rng.choice((2, 3)))
        rest = [x for x in range(10, 60) if x not in a]
        b = shared + rng.sample(rest, 4 - len(shared))
        rng.shuffle(b)
        return (tuple(a), tuple(b))

    def render_slots(self, params):
        return {"A": fmt_items(params[0]), "B": fmt_items(params[1])}

    def params_from_match(self, m):
        a = tuple(int(x) for x in m.group(1).split())
        b = tuple(int(x) for x in m.group(2).split())
        return (a, b) if len(set(a)) == len(a) else None

    def count(self, params):
        return 1

    def items_ok(self, params, items):
        return all(x in params[0] for x in items), f"{fmt_items(items)} in first list"

    def goal_ok(self, params, items):
        return items[0] not in params[1], f"{items[0]} not in second list"

    def solutions(self, params):
        return [(x,) for x in params[0] if x not in params[1]]

    def near_miss_pool(self, params):
        return sorted(set(params[0]) | set(params[1]) | {n + d for n in params[0] for d in (-1, 1)})

    def drill(self, rng):
        a, b = self.sample_params(rng)
        checks = ". ".join(f"{x} not in second list: {'yes' if x not in b else 'no'}" for x in rng.sample(a, len(a)))
        return f"First list: {fmt_items(a)}\nSecond list: {fmt_items(b)}\nChecks: {checks}."
