"""The default world's families: sums, parity and comparisons, whose checks redo the answer's arithmetic."""
from __future__ import annotations

from .base import NUM_RX, LIST_RX, NUMBER_WORDS, WORD_NUMBERS, Family, compile_templates, fmt_items

class SumDigits(Family):
    """"Give three digits that sum to 14." -> "5 9 0"."""

    name = "sum_digits"
    templates = (
        "Give {k} digits that sum to {t}.",
        "Write {k} digits whose sum is {t}.",
        "Name {k} digits that add up to {t}.",
        "List {k} digits with a sum of {t}.",
    )
    patterns = compile_templates(templates, {"k": r"(two|three)", "t": NUM_RX})

    def sample_params(self, rng):
        k = rng.choice((2, 3))
        return (k, rng.randint(1, 9 * k - 2))

    def render_slots(self, params):
        return {"k": NUMBER_WORDS[params[0]], "t": params[1]}

    def params_from_match(self, m):
        return (WORD_NUMBERS[m.group(1).lower()], int(m.group(2)))

    def count(self, params):
        return params[0]

    def items_ok(self, params, items):
        return all(0 <= x <= 9 for x in items), f"{fmt_items(items)} digits"

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
    patterns = compile_templates(templates, {"L": LIST_RX, "t": NUM_RX})

    def sample_params(self, rng):
        nums = rng.sample(range(1, 10), rng.choice((4, 5)))
        a, b = rng.sample(nums, 2)
        return (tuple(nums), a + b)

    def render_slots(self, params):
        return {"L": fmt_items(params[0]), "t": params[1]}

    def params_from_match(self, m):
        nums = tuple(int(x) for x in m.group(1).split())
        return (nums, int(m.group(2))) if len(set(nums)) == len(nums) else None

    def count(self, params):
        return 2

    def items_ok(self, params, items):
        ok = all(x in params[0] for x in items) and len(set(items)) == len(items)
        return ok, f"{fmt_items(items)} in list"

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
    patterns = compile_templates(templates, {"p": r"(even|odd)", "a": NUM_RX, "b": NUM_RX})

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
    patterns = compile_templates(templates, {"L": LIST_RX, "d": r"(bigger|smaller)", "x": NUM_RX})

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
        return {"L": fmt_items(params[0]), "d": params[1], "x": params[2]}

    def params_from_match(self, m):
        nums = tuple(int(x) for x in m.group(1).split())
        return (nums, m.group(2).lower(), int(m.group(3))) if len(set(nums)) == len(nums) else None

    def count(self, params):
        return 1

    def items_ok(self, params, items):
        return all(x in params[0] for x in items), f"{fmt_items(items)} in list"

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
