"""Reward-model metrics against a hand-computed example and scipy; head-to-head; histograms."""
import json
import math

import pytest
from scipy import stats

from loop.eval import export_alpaca_eval, head_to_head, reward_model_metrics, score_histogram, verdict


def _examples(groups):
    ex, scores = [], {}
    for g, items in groups.items():
        for i, (rank, score) in enumerate(items):
            ex.append({"id": f"{g}{i}", "group_id": g, "rank": rank})
            scores[f"{g}{i}"] = score
    return ex, scores


def test_hand_computed():
    ex, scores = _examples({
        "g1": [(0, 5.0), (1, 3.0), (2, 1.0)],   # perfect order: 3/3 pairs, exact match
        "g2": [(0, 2.0), (1, 4.0)],             # inverted: 0/1, five none
        "g3": [(0, 4.0), (1, 4.0), (2, 5.0)],   # pairs: (0,1) tie=0.5, (0,2) wrong, (1,2) wrong
        "g4": [(0, 5.0), (1, None)],            # unscored dropped -> group of 1: no pairs
    })
    m = reward_model_metrics(ex, scores)
    assert m["num_pairs"] == 7 and m["num_unscored"] == 1
    assert m["pairwise_accuracy"] == pytest.approx(100 * 3.5 / 7)
    assert m["exact_match"] == pytest.approx(100 * 1 / 3)  # g1 only, among g1..g3 (g4 has < 2 scored)
    # judged 5: g1[0] (best), g3[2] (worst), g4[0] (best of its remaining group) -> 2/3
    assert m["five_best"] == pytest.approx(100 * 2 / 3)
    sp = [stats.spearmanr([5, 3, 1], [0, -1, -2]).statistic, stats.spearmanr([2, 4], [0, -1]).statistic,
          stats.spearmanr([4, 4, 5], [0, -1, -2]).statistic]
    kt = [stats.kendalltau([5, 3, 1], [0, -1, -2]).statistic, stats.kendalltau([2, 4], [0, -1]).statistic,
          stats.kendalltau([4, 4, 5], [0, -1, -2]).statistic]
    assert m["spearman"] == pytest.approx(sum(sp) / 3)
    assert m["kendall_tau"] == pytest.approx(sum(kt) / 3)
    assert sp[0] == pytest.approx(1.0) and sp[1] == pytest.approx(-1.0)
    assert sp[2] == pytest.approx(-math.sqrt(3) / 2)  # ranks (1.5,1.5,3) vs (3,2,1), by hand


def test_human_ties_and_constant_judge():
    ex, scores = _examples({"g": [(0, 3.0), (0, 3.0), (1, 3.0)]})
    m = reward_model_metrics(ex, scores)
    assert m["num_pairs"] == 2 and m["pairwise_accuracy"] == 50.0  # constant judge = chance
    assert m["exact_match"] == 0.0  # judge says all tied, humans do not
    assert math.isnan(m["spearman"]) and math.isnan(m["five_best"])


def test_head_to_head_disagreement_is_tie():
    r = head_to_head([1, 1, -1, 0, 1], [1, -1, -1, 0, 0])
    assert r == {"win": 20.0, "loss": 20.0, "tie": 60.0, "num_prompts": 5}
    with pytest.raises(ValueError):
        head_to_head([1], [])
    assert verdict(4.0, None) == 1 and verdict(None, 2.0) == -1 and verdict(None, None) == 0 and verdict(3, 3) == 0


def test_histogram_and_alpaca_export(tmp_path):
    assert score_histogram([4.0, 3.6, None, 0.2, 5.0]) == {"0": 1, "1": 0, "2": 0, "3": 0, "4": 2, "5": 1, "none": 1}
    n = export_alpaca_eval(tmp_path / "a.json", [{"id": "1", "prompt": "hi", "text": "hello"}], "M2")
    rows = json.loads((tmp_path / "a.json").read_text())
    assert n == 1 and rows[0]["instruction"] == "hi" and rows[0]["output"] == "hello" and rows[0]["generator"] == "M2"
