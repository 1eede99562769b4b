"""judge.mode = vote (loop/vote.py): the self-consistency score, and stage 3 with it."""
import json
import random

import pytest

from loop.pairs import PairRules, build_pairs
from loop.vote import answer_key, vote_records


def test_equal_answers_after_normalisation():
    assert answer_key("  42.\n") == answer_key("42") == answer_key("42 !") == "42"
    assert answer_key("Odd  Even") == answer_key("odd even")
    assert answer_key("42") != answer_key("4 2") and answer_key("24") != answer_key("42")


def test_score_is_five_times_the_share_of_equal_answers():
    texts = {"a": ["7", "7 ", "3", "7."], "b": ["1", "2", "3"]}
    items = [{"id": f"{g}{i}", "prompt_id": g, "text": t} for g, ts in texts.items() for i, t in enumerate(ts)]
    recs = vote_records(items)
    got = {r["target_id"]: r["score"] for r in recs}
    assert got == {"a0": 3.75, "a1": 3.75, "a2": 1.25, "a3": 3.75, "b0": 5 / 3, "b1": 5 / 3, "b2": 5 / 3}
    assert [r["target_id"] for r in recs] == [it["id"] for it in items]  # one record per item, in order
    assert len({r["id"] for r in recs}) == len(recs) and all(r["finish_reason"] == "vote" for r in recs)


@pytest.mark.parametrize("seed", range(3))
def test_scores_match_a_brute_force_count(seed):
    rng = random.Random(seed)
    items = [{"id": f"r{i}", "prompt_id": f"p{rng.randrange(5)}", "text": str(rng.randrange(4))} for i in range(60)]
    got = {r["target_id"]: r["score"] for r in vote_records(items)}
    for it in items:
        same = [o for o in items if o["prompt_id"] == it["prompt_id"]]
        want = 5.0 * sum(o["text"] == it["text"] for o in same) / len(same)
        assert got[it["id"]] == pytest.approx(want)


def test_pairs_are_majority_over_minority_and_all_distinct_gives_none():
    prompts = [{"id": "p", "prompt": "?"}, {"id": "q", "prompt": "?"}]
    texts = {"p": ["5", "5", "9", "5"], "q": ["1", "2", "3", "4"]}
    responses = [{"id": f"{p}{i}", "prompt_id": p, "sample_index": i, "text": t, "num_tokens": 2}
                 for p, ts in texts.items() for i, t in enumerate(ts)]
    scores = {r["target_id"]: r["score"] for r in vote_records(responses)}
    pairs, outcomes, _ = build_pairs(prompts, responses, scores, PairRules(), frozenset())
    assert len(pairs) == 1 and pairs[0]["rejected"] == "9" and pairs[0]["chosen"] == "5"
    assert [o["dropped"] for o in outcomes if o["id"] == "q"] != [None]


def test_vote_with_meta_judging_is_a_config_error():
    from loop.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="meta.enabled"):
        load_config(None, ["judge.mode=vote", "meta.enabled=true"])
