"""ROUGE-L (bit-parallel LCS vs a plain DP), self-instruct shots, instruction extraction and filtering."""
import random

from loop.prompts import extract_instruction, filter_instructions, load_self_instruct_template, self_instruct_requests
from loop.rouge import RougeFilter, lcs_length, rouge_l_f, rouge_tokens


def _lcs_dp(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_lcs_matches_dp():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_values():
    a, b = rouge_tokens("The cat sat on the mat."), rouge_tokens("the cat is on a mat")
    # LCS = the cat on mat = 4; P = 4/6, R = 4/6
    assert rouge_l_f(a, b) == 4 / 6
    assert rouge_l_f(a, a) == 1.0 and rouge_l_f(a, []) == 0.0


def test_rouge_filter_bound_does_not_change_answer():
    rng = random.Random(1)
    words = "add the numbers list sum pick two even odd from between".split()
    pool = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(60)]
    f = RougeFilter(0.7)
    for t in pool[:40]:
        f.add(t)
    for q in pool[40:]:
        brute = max(rouge_l_f(rouge_tokens(t), rouge_tokens(q)) for t in pool[:40])
        assert abs(f.max_similarity(q) - brute) < 1e-12


def test_self_instruct_requests_stable():
    tpl = load_self_instruct_template("self_instruct.txt")
    ift = [f"ift task {i}" for i in range(20)]
    gen = [f"generated task {i}" for i in range(5)]
    r1 = self_instruct_requests(tpl, ift, gen, attempts=4, n_ift=6, n_generated=2, run_seed=3, iteration=2)
    r2 = self_instruct_requests(tpl, ift, gen, attempts=4, n_ift=6, n_generated=2, run_seed=3, iteration=2)
    assert r1 == r2 and len({r["id"] for r in r1}) == 4
    text = r1[0]["text"]
    assert text.count("generated task") == 2 and text.count("ift task") == 6 and text.rstrip().endswith("Task 9:")
    first = self_instruct_requests(tpl, ift, [], attempts=1, n_ift=6, n_generated=2, run_seed=3, iteration=1)
    assert first[0]["text"].count("ift task") == 8  # no earlier prompts yet: all 8 shots from IFT


def test_extract_instruction():
    assert extract_instruction(" Task 9: Add 3 and 4.\nTask 10: something else") == "Add 3 and 4."
    assert extract_instruction("List two even numbers.\n\nSure! 2 and 4.") == "List two even numbers."
    assert extract_instruction("1. Pick a number\n2. Another") == "Pick a number"


def test_filter_reasons():
    cands = [{"id": str(i), "instruction": t} for i, t in enumerate([
        "Add the digits of 1234 together.",        # kept
        "",                                         # empty
        "Hi",                                       # length
        "Draw a picture of a cat for me please.",   # keyword
        "add the digits of 1234  together.",        # duplicate of kept
        "Add the digits of 1234 together now.",     # rouge vs kept
        "Name two odd numbers between 3 and 9.",    # kept
        "Explain why the sky is blue today.",       # surplus (want=2)
    ])]
    kept, reasons = filter_instructions(cands, ["Sum the list 1 2 3."], want=2, rouge_threshold=0.7, min_words=3,
                                        max_words=20, banned_keywords=("picture", "draw"))
    assert [k["id"] for k in kept] == ["0", "6"]
    assert reasons == {"empty": 1, "length": 1, "keyword": 1, "duplicate": 1, "rouge": 1, "surplus": 1}
    kept, reasons = filter_instructions(cands[:1], [], want=5, rouge_threshold=0.7, min_words=1, max_words=20,
                                        banned_keywords=(), is_valid=lambda t: False)
    assert not kept and reasons == {"invalid": 1}
