"""Evaluation metrics: the model as a reward model (paper Table 4), head-to-head win rates, lengths.

Reward-model metrics compare the judge's scores with human (or ground-truth) ranks inside each
group (one instruction with several ranked responses). Rank 0 is best; equal ranks are human ties.
Conventions the paper leaves open, fixed here:
- A response whose judgment had no parsable score is left out of its group (and counted).
- Pairwise accuracy: over response pairs with different human ranks; a judge tie counts 1/2
  (so a constant judge scores 50%, chance level).
- Exact match: a group (>= 2 scored responses) whose judge ordering, ties included, equals the
  human ordering for every pair.
- 5-best %: among responses whose (mean) judge score rounds to 5, the share humans ranked best.
- Spearman / Kendall tau-b (scipy): computed per group between judge score and -rank, averaged
  over groups where both sides vary (a constant side has no defined correlation).
"""
from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from pathlib import Path

from scipy import stats

from .records import write_json


def reward_model_metrics(examples: list[dict], scores: dict[str, float | None]) -> dict:
    """examples: {"id", "group_id", "rank"}; scores: example id -> judge score or None."""
    groups: dict[str, list[tuple[float, int]]] = {}
    unscored = 0
    for ex in examples:
        s = scores.get(ex["id"])
        if s is None:
            unscored += 1
            continue
        groups.setdefault(ex["group_id"], []).append((float(s), int(ex["rank"])))
    agree = total_pairs = 0.0
    exact = exact_groups = 0
    five = five_best = 0
    spearman, kendall = [], []
    for items in groups.values():
        best_rank = min(r for _, r in items)
        for s, r in items:
            if round(s) == 5:
                five += 1
                five_best += r == best_rank
        if len(items) < 2:
            continue
        all_agree = True
        for (s1, r1), (s2, r2) in combinations(items, 2):
            judge_sign = (s1 > s2) - (s1 < s2)
            human_sign = (r1 < r2) - (r1 > r2)  # lower rank = better
            all_agree &= judge_sign == human_sign
            if human_sign == 0:
                continue
            total_pairs += 1
            agree += 1.0 if judge_sign == human_sign else 0.5 if judge_sign == 0 else 0.0
        exact_groups += 1
        exact += all_agree
        js = [s for s, _ in items]
        hs = [-r for _, r in items]
        if len(set(js)) > 1 and len(set(hs)) > 1:
            spearman.append(stats.spearmanr(js, hs).statistic)
            kendall.append(stats.kendalltau(js, hs).statistic)
    nan = float("nan")
    return {
        "pairwise_accuracy": 100.0 * agree / total_pairs if total_pairs else nan,
        "five_best": 100.0 * five_best / five if five else nan,
        "exact_match": 100.0 * exact / exact_groups if exact_groups else nan,
        "spearman": sum(spearman) / len(spearman) if spearman else nan,
        "kendall_tau": sum(kendall) / len(kendall) if kendall else nan,
        "num_pairs": int(total_pairs),
        "num_groups": exact_groups,
        "num_unscored": unscored,
        "num_judged_five": five,
    }


def head_to_head(verdicts_ab: list[int], verdicts_ba: list[int]) -> dict:
    """Win rate of A over B from two judging passes, one per presentation order.

    verdicts_*[i] is +1 when the judge preferred A on prompt i, -1 for B, 0 for a tie (already
    translated back to A/B, whichever position A was shown in). A win needs both orders to agree;
    any disagreement is a tie, which cancels the judge's position bias.
    """
    if len(verdicts_ab) != len(verdicts_ba):
        raise ValueError("head_to_head: both orders must judge the same prompts")
    n = len(verdicts_ab)
    win = sum(1 for a, b in zip(verdicts_ab, verdicts_ba) if a > 0 and b > 0)
    loss = sum(1 for a, b in zip(verdicts_ab, verdicts_ba) if a < 0 and b < 0)
    tie = n - win - loss
    pct = (lambda k: 100.0 * k / n) if n else (lambda k: float("nan"))
    return {"win": pct(win), "loss": pct(loss), "tie": pct(tie), "num_prompts": n}


def verdict(score_a: float | None, score_b: float | None) -> int:
    """+1 / -1 / 0 from two pointwise scores; an unscored response loses to a scored one."""
    if score_a is None and score_b is None:
        return 0
    if score_b is None:
        return 1
    if score_a is None:
        return -1
    return (score_a > score_b) - (score_a < score_b)


def score_histogram(scores: list[float | None], bins: int = 6) -> dict[str, int]:
    """Counts of scores rounded to integers 0..bins-1, plus "none" for unparsable judgments."""
    hist = Counter({str(k): 0 for k in range(bins)})
    hist["none"] = 0
    for s in scores:
        hist["none" if s is None else str(min(bins - 1, max(0, int(math.floor(s + 0.5)))))] += 1
    return dict(hist)


def length_stats(token_counts: list[int], texts: list[str]) -> dict:
    n = len(token_counts)
    return {
        "mean_tokens": sum(token_counts) / n if n else float("nan"),
        "mean_chars": sum(len(t) for t in texts) / n if n else float("nan"),
        "num_responses": n,
    }


def export_alpaca_eval(path: str | Path, generations: list[dict], generator: str) -> int:
    """AlpacaEval's `--model_outputs` format: a JSON list of {instruction, output, generator}."""
    rows = [{"instruction": g["prompt"], "output": g["text"], "generator": generator,
             "dataset": g.get("dataset", "selfreward")} for g in generations]
    write_json(path, rows)
    return len(rows)
