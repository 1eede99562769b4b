"""Self-pair accuracy (loop/self_pairs.py): the judge's order of one prompt's own responses against the grader's.

The end-to-end check (the metric in eval's done.json, its records, the same records on 2 ranks) is in
test_loop_run.py and test_loop_dist.py, whose runs evaluate every model with it.
"""
import random

import pytest

from loop.self_pairs import self_pair_accuracy


def _data(n_prompts=7, n=4, seed=0):
    rng = random.Random(seed)
    responses = [{"id": f"p{p}-r{i}", "prompt_id": f"p{p}"} for p in range(n_prompts) for i in range(n)]
    grades = {r["id"]: float(rng.randint(1, 5)) for r in responses}
    return responses, grades


def _brute(responses, grades, scores):
    """Every ordered pair of one prompt, counted by hand (the oracle for the combinations() version)."""
    agree = disagree = tie = 0
    for a in responses:
        for b in responses:
            if a["prompt_id"] != b["prompt_id"] or a["id"] >= b["id"]:
                continue
            if scores.get(a["id"]) is None or scores.get(b["id"]) is None or grades[a["id"]] == grades[b["id"]]:
                continue
            g, j = grades[a["id"]] - grades[b["id"]], scores[a["id"]] - scores[b["id"]]
            if j == 0:
                tie += 1
            elif (g > 0) == (j > 0):
                agree += 1
            else:
                disagree += 1
    return agree, disagree, tie


def test_constant_judge_is_chance():
    responses, grades = _data()
    s = self_pair_accuracy(responses, grades, {r["id"]: 5.0 for r in responses})
    assert s["accuracy"] == 50.0 and s["tie"] == s["num_pairs"] > 0 and s["agree"] == s["disagree"] == 0


def test_perfect_and_reversed_judges():
    responses, grades = _data()
    perfect = self_pair_accuracy(responses, grades, {i: 2.0 * g + 1 for i, g in grades.items()})
    reversed_ = self_pair_accuracy(responses, grades, {i: -g for i, g in grades.items()})
    assert perfect["accuracy"] == 100.0 and reversed_["accuracy"] == 0.0
    assert perfect["num_pairs"] == reversed_["num_pairs"] == reversed_["disagree"] > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_judge_matches_brute_force(seed):
    responses, grades = _data(n_prompts=9, n=5, seed=seed)
    rng = random.Random(100 + seed)
    scores = {r["id"]: (None if rng.random() < 0.2 else float(rng.randint(1, 5))) for r in responses}
    s = self_pair_accuracy(responses, grades, scores)
    agree, disagree, tie = _brute(responses, grades, scores)
    assert (s["agree"], s["disagree"], s["tie"]) == (agree, disagree, tie)
    assert s["num_pairs"] == agree + disagree + tie
    assert s["accuracy"] == pytest.approx(100.0 * (agree + tie / 2) / (agree + disagree + tie))
    assert s["unscored"] == sum(v is None for v in scores.values()) and s["prompts"] == 9


def test_same_grade_pairs_and_unscored_responses_are_left_out():
    responses = [{"id": i, "prompt_id": "a"} for i in ("a1", "a2", "a3")] + \
                [{"id": i, "prompt_id": "b"} for i in ("b1", "b2")]
    grades = {"a1": 5.0, "a2": 5.0, "a3": 1.0, "b1": 4.0, "b2": 2.0}
    # a1/a2 share a grade (no signal); b2 has no parsable judgment, so prompt b has no pair
    scores = {"a1": 4.0, "a2": 1.0, "a3": 2.0, "b1": 3.0, "b2": None}
    s = self_pair_accuracy(responses, grades, scores)
    assert (s["agree"], s["disagree"], s["tie"], s["num_pairs"]) == (1, 1, 0, 2)  # a1>a3 right, a2<a3 wrong
    assert s["accuracy"] == 50.0 and s["unscored"] == 1 and s["prompts_with_pair"] == 50.0


def test_no_pair_measures_nothing():
    responses = [{"id": "x", "prompt_id": "p"}, {"id": "y", "prompt_id": "p"}]
    s = self_pair_accuracy(responses, {"x": 3.0, "y": 3.0}, {"x": 1.0, "y": 5.0})
    assert s["accuracy"] is None and s["num_pairs"] == 0 and s["prompts_with_pair"] == 0.0
