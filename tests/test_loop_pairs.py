"""Pair builder: max vs min mean score, ties dropped, unscored responses excluded, reasons counted."""
from loop.pairs import DROP_NO_RESPONSES, DROP_TIE, DROP_TOO_FEW_SCORED, PairRules, build_pairs


def _data(scores_by_prompt):
    prompts, responses, scores = [], [], {}
    for pid, scores_list in scores_by_prompt.items():
        prompts.append({"id": pid, "prompt": f"prompt {pid}"})
        for k, s in enumerate(scores_list):
            rid = f"{pid}-s{k}"
            responses.append({"id": rid, "prompt_id": pid, "sample_index": k, "text": f"{pid} answer {k}" + "x" * k,
                              "num_tokens": 10 - k})
            scores[rid] = s
    return prompts, responses, scores


def test_pairs_and_reasons():
    prompts, responses, scores = _data({
        "a": [3.0, 4.5, 1.0, 2.0],       # pair: s1 vs s2
        "b": [4.0, 4.0, 4.0, 4.0],       # all tied
        "c": [None, 3.0, None, None],    # one valid score only
        "d": [None, 2.0, 5.0, None],     # unscored excluded, pair from the two valid ones
        "e": [],                         # no responses at all
        "f": [2.0, 2.0, None, 2.0],      # tie among valid ones
    })
    pairs, outcomes, reasons = build_pairs(prompts, responses, scores, PairRules())
    assert [(p["id"], p["chosen_id"], p["rejected_id"]) for p in pairs] == [("a", "a-s1", "a-s2"), ("d", "d-s2", "d-s1")]
    assert pairs[0]["chosen_score"] == 4.5 and pairs[0]["rejected_score"] == 1.0
    assert dict(reasons) == {DROP_TIE: 2, DROP_TOO_FEW_SCORED: 1, DROP_NO_RESPONSES: 1}
    by_id = {o["id"]: o for o in outcomes}
    assert len(outcomes) == len(prompts)
    assert by_id["c"]["dropped"] == DROP_TOO_FEW_SCORED and by_id["c"]["num_scored"] == 1
    assert by_id["b"]["dropped"] == DROP_TIE and by_id["a"]["dropped"] is None
    assert by_id["d"]["scores"] == [None, 2.0, 5.0, None]  # None stays None, never a number


def test_min_scored_and_min_gap():
    prompts, responses, scores = _data({"a": [1.0, 2.0, None, None], "b": [3.0, 3.2, 3.1, 3.0]})
    pairs, _, reasons = build_pairs(prompts, responses, scores, PairRules(min_scored=3))
    assert [p["id"] for p in pairs] == ["b"] and reasons[DROP_TOO_FEW_SCORED] == 1 and reasons[DROP_TIE] == 0
    pairs, _, reasons = build_pairs(prompts, responses, scores, PairRules(min_gap=0.5))
    assert [p["id"] for p in pairs] == ["a"] and reasons[DROP_TIE] == 1


def test_length_control_picks_shortest_near_top():
    # num_tokens = 10 - k: later samples are shorter. Top is 5.0 (s0); s2 at 4.8 is within 0.3 and shorter.
    prompts, responses, scores = _data({"a": [5.0, 1.0, 4.8, 4.0]})
    pairs, _, _ = build_pairs(prompts, responses, scores, PairRules())
    assert pairs[0]["chosen_id"] == "a-s0"
    pairs, _, _ = build_pairs(prompts, responses, scores, PairRules(length_control=True, length_margin=0.3))
    assert pairs[0]["chosen_id"] == "a-s2" and pairs[0]["rejected_id"] == "a-s1"


def test_distinct_texts_pools_samples_of_one_text():
    from loop.pairs import DROP_SAME_TEXT
    # a: samples 0 and 1 write "X" (judged 5 and 1: mean 3), samples 2 and 3 write "Y" (3 and 4: mean 3.5);
    # b: all four samples write "Z", judged apart.
    prompts, responses, scores = _data({"a": [5.0, 1.0, 3.0, 4.0], "b": [5.0, 2.0, 3.0, 4.0]})
    for r in responses:
        r["text"] = "Z" if r["prompt_id"] == "b" else "X" if r["sample_index"] < 2 else "Y"
    pairs, _, reasons = build_pairs(prompts, responses, scores, PairRules())
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("X", "X"), ("Z", "Z")]  # the paper's rule
    pairs, outcomes, reasons = build_pairs(prompts, responses, scores, PairRules(distinct_texts=True))
    assert [(p["id"], p["chosen_id"], p["rejected_id"]) for p in pairs] == [("a", "a-s2", "a-s0")]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("Y", "X")
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (3.5, 3.0)
    assert dict(reasons) == {DROP_SAME_TEXT: 1} and outcomes[1]["dropped"] == DROP_SAME_TEXT
