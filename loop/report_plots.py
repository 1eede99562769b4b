"""The report's PNG plots (matplotlib, Agg), each made only when the run has data for it, each written
atomically (temp name, then os.replace), so a reader never sees half a PNG.

x = iteration everywhere an axis runs over the loop: iteration t judged M_t's responses and trained
M_{t+1}; in the win-rate plot, iteration 0 is M1 (the SFT model).
"""
from __future__ import annotations

import math
from pathlib import Path

from common.atomic import atomic_write

from .stages import JUDGMENTS, RESPONSES

SCORE_LABELS = ["0", "1", "2", "3", "4", "5", "none"]
OUTCOMES = (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, top: float = 1.0) -> str:
    plt = _plt()
    try:
        fig.tight_layout(rect=(0, 0, 1, top))  # top < 1 leaves room for a figure-wide legend
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path.name


def _num(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _grouped_bars(ax, labels: list[str], series: list[tuple[str, dict]]) -> None:
    width = 0.8 / len(series)
    for i, (name, counts) in enumerate(series):
        ax.bar([x + i * width for x in range(len(labels))], [counts.get(k, 0) for k in labels], width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)


def score_distribution(iters: list[dict], out: Path) -> str | None:
    """Left: every judgment's score (rounded, "none" = unparsable); right: responses by mean score."""
    judged = [it for it in iters if it[JUDGMENTS.name] is not None]
    if not judged:
        return None
    plt = _plt()
    means = [it for it in judged if it.get("mean_scores")]
    fig, axes = plt.subplots(1, 2 if means else 1, figsize=(11 if means else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    _grouped_bars(ax, SCORE_LABELS, [(f"iter {it['t']} (M{it['t']} judging)", it[JUDGMENTS.name].get("histogram") or {})
                                     for it in judged])
    ax.set_xlabel("self-judged score of each judgment (rounded)")
    ax.set_ylabel("judgments")
    ax.legend()
    if means:
        ax = axes[0][1]
        labels = list(means[0]["mean_scores"])
        _grouped_bars(ax, labels, [(f"iter {it['t']}", it["mean_scores"]) for it in means])
        ax.set_xlabel("mean self-judged score of each response (nearest 0.5)")
        ax.set_ylabel("responses")
        ax.legend()
    return _save(fig, out / "score_distribution.png")


def pairs(iters: list[dict], out: Path) -> str | None:
    """Per iteration: mean chosen / rejected score and their gap; mean tokens chosen / rejected / all."""
    rows = [(it["t"], it["pair_stats"]) for it in iters if it.get("pair_stats") and it["pair_stats"]["pairs"]]
    if not rows:
        return None
    plt = _plt()
    ts = [t for t, _ in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.bar(ts, [_num(s["mean_gap"]) for _, s in rows], 0.5, color="tab:gray", alpha=0.5, label="mean gap")
    for key, label, marker in (("mean_chosen_score", "chosen", "o"), ("mean_rejected_score", "rejected", "s")):
        a.plot(ts, [_num(s[key]) for _, s in rows], marker=marker, label=label)
    a.set_ylabel("mean self-judged score")
    for key, label, marker in (("mean_chosen_tokens", "chosen", "o"), ("mean_rejected_tokens", "rejected", "s"),
                               ("mean_response_tokens", "all responses", "^")):
        b.plot(ts, [_num(s[key]) for _, s in rows], marker=marker, label=label)
    b.set_ylabel("mean response tokens")
    for ax in (a, b):
        ax.set_xticks(ts)
        ax.set_xlabel("iteration")
        ax.legend()
    return _save(fig, out / "pairs.png")


def win_rate(rows: list[dict], out: Path) -> str | None:
    """Stacked win / tie / loss per iteration; one panel per (judge, opponent: SFT baseline or predecessor)."""
    if not rows:
        return None
    plt = _plt()
    judges = sorted({r["judge"] for r in rows}, reverse=True)  # the pairwise judge first, as the paper's GPT-4
    against = [a for a in ("sft_baseline", "previous") if any(r["against"] == a for r in rows)]
    fig, axes = plt.subplots(len(judges), len(against), figsize=(5 * len(against), 3 * len(judges)), squeeze=False)
    for i, judge in enumerate(judges):
        for j, opp in enumerate(against):
            ax = axes[i][j]
            sel = [r for r in rows if r["judge"] == judge and r["against"] == opp]
            ts = [r["iteration"] for r in sel]
            bottom = [0.0] * len(sel)
            for key, color in OUTCOMES:
                vals = [_num(r[key]) for r in sel]
                ax.bar(ts, vals, 0.6, bottom=bottom, color=color, label=f"{key} %")
                bottom = [x + y for x, y in zip(bottom, vals)]
            ax.set_xticks(ts, [f"{r['iteration']} ({r['model']})" for r in sel])
            ax.set_ylim(0, 100)
            ax.set_xlabel("iteration")
            ax.set_ylabel("% of prompts")
            ax.set_title(f"vs {'SFT baseline' if opp == 'sft_baseline' else 'predecessor'}, {judge}", fontsize=10)
            if not sel:
                ax.text(0.5, 0.5, "no match", ha="center", va="center", transform=ax.transAxes)
    fig.legend(*axes[0][0].get_legend_handles_labels(), ncol=3, loc="upper center")
    return _save(fig, out / "win_rate.png", top=1 - 0.35 / fig.get_figheight())


def lengths_and_metrics(data: dict, out: Path) -> list[str]:
    """Eval answer lengths beside AIFT response lengths; the model as a reward model, ground-truth accuracy."""
    evals = data["evals"]
    if not evals:
        return []
    plt = _plt()
    made, names = [], list(evals)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(names, [_num((evals[n].get("length") or {}).get("mean_tokens")) for n in names], marker="o",
            label="eval responses")
    resp = [(f"M{it['t']}", it[RESPONSES.name].get("mean_tokens")) for it in data["iterations"]
            if it[RESPONSES.name] is not None]
    if resp:
        ax.plot([r[0] for r in resp], [_num(r[1]) for r in resp], marker="s", label="AIFT responses")
    ax.set_ylabel("mean response tokens")
    ax.legend()
    made.append(_save(fig, out / "lengths.png"))
    rm = {n: evals[n]["reward_model"] for n in names if evals[n].get("reward_model")}
    graded = {n: evals[n]["grader"] for n in names if evals[n].get("grader")}
    if rm or graded:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("pairwise_accuracy", "pairwise acc. %"), ("exact_match", "exact match %"),
                           ("five_best", "5-best %")):
            if rm:
                ax.plot(list(rm), [_num(rm[n].get(key)) for n in rm], marker="o", label=label)
        if graded:
            ax.plot(list(graded), [_num(graded[n].get("accuracy")) for n in graded], marker="^",
                    label="ground-truth acc. %")
        ax.set_ylabel("%")
        ax.legend()
        made.append(_save(fig, out / "metrics.png"))
    return made


def head_to_head(data: dict, out: Path) -> str | None:
    """Every match as one stacked bar: pairwise judge and ground-truth grader."""
    matches = [(f"{k} (judge)", v) for k, v in data.get("pairwise", {}).items()]
    matches += [(f"{k} (grader)", v) for k, v in data["head_to_head"].items()]
    if not matches:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.9 + 0.45 * len(matches)))
    left = [0.0] * len(matches)
    for key, color in OUTCOMES:
        vals = [_num(v.get(key)) for _, v in matches]
        ax.barh([m for m, _ in matches], vals, left=left, color=color, label=f"{key} %")
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of prompts")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _save(fig, out / "head_to_head.png")


def make_plots(run_dir: Path, data: dict) -> list[str]:
    """Write run_dir/plots/*.png for what data holds; returns the file names made."""
    out = Path(run_dir) / "plots"
    made = [score_distribution(data["iterations"], out), pairs(data["iterations"], out)]
    made += lengths_and_metrics(data, out)
    made += [head_to_head(data, out), win_rate(data.get("win_rates") or [], out)]
    return [m for m in made if m]
