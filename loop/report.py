"""report.md and PNG plots for a run directory, built only from the stages' done.json summaries.

Because it reads nothing but finished artifacts, `python -m loop.report RUN_DIR` can rebuild the
report of any run (finished or not) without loading a model.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .config import LoopConfig
from .records import atomic_write_text
from .stage_eval import head_to_head_from_grades


def _summary(path: Path) -> dict | None:
    f = path / "done.json"
    return json.loads(f.read_text()) if f.exists() else None


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def collect(run_dir: Path) -> dict:
    iters, t = [], 1
    while (run_dir / f"iter_{t}").exists():
        d = run_dir / f"iter_{t}"
        iters.append({"t": t, **{name: _summary(d / name) for name in
                                 ("1_prompts", "2_responses", "3_judgments", "4_pairs", "5_ref_logprobs", "6_dpo")}})
        t += 1
    models = ["sft_baseline"] + [f"M{k}" for k in range(1, len(iters) + 2)]
    evals = {m: _summary(run_dir / "eval" / m) for m in models}
    evals = {m: e for m, e in evals.items() if e is not None}
    h2h = {}
    for m in evals:
        if m == "sft_baseline":
            continue
        k = int(m[1:])
        for other in ("sft_baseline", f"M{k - 1}"):
            a, b = run_dir / "eval" / m / "grades.jsonl", run_dir / "eval" / other / "grades.jsonl"
            if other in evals and other != m and a.exists() and b.exists():
                h2h[f"{m} vs {other}"] = head_to_head_from_grades(a, b)
    pairwise = {f"{m} vs {opp}": v for m, e in evals.items() for opp, v in (e.get("pairwise") or {}).items()}
    return {"iterations": iters, "evals": evals, "head_to_head": h2h, "pairwise": pairwise,
            "sft": {n: _summary(run_dir / "sft" / n) for n in ("sft_baseline", "M1")},
            "eft": _summary(run_dir / "eft"), "seed": _summary(run_dir / "seed")}


def _plots(run_dir: Path, data: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    made = []
    iters = [it for it in data["iterations"] if it["3_judgments"]]
    if iters:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["0", "1", "2", "3", "4", "5", "none"]
        width = 0.8 / len(iters)
        for i, it in enumerate(iters):
            h = it["3_judgments"]["histogram"]
            ax.bar([x + i * width for x in range(len(labels))], [h.get(k, 0) for k in labels], width,
                   label=f"iter {it['t']} (M{it['t']} judging)")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
        ax.set_xlabel("self-judged score (rounded)")
        ax.set_ylabel("judgments")
        ax.legend()
        made.append(_save(fig, out_dir / "score_distribution.png"))
    evals = data["evals"]
    if evals:
        names = list(evals)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(names, [evals[n]["length"]["mean_tokens"] for n in names], marker="o", label="eval responses")
        resp = [(f"M{it['t']}", it["2_responses"]["mean_tokens"]) for it in data["iterations"] if it["2_responses"]]
        if resp:
            ax.plot([r[0] for r in resp], [r[1] for r in resp], marker="s", label="AIFT responses")
        ax.set_ylabel("mean response tokens")
        ax.legend()
        made.append(_save(fig, out_dir / "lengths.png"))
        keys = [("pairwise_accuracy", "pairwise acc. %"), ("exact_match", "exact match %"), ("five_best", "5-best %")]
        rm = {n: evals[n].get("reward_model") for n in names if evals[n].get("reward_model")}
        graded = {n: evals[n]["grader"] for n in names if evals[n].get("grader")}
        if rm or graded:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for key, label in keys:
                if rm:
                    ax.plot(list(rm), [rm[n][key] for n in rm], marker="o", label=label)
            if graded:
                ax.plot(list(graded), [graded[n]["accuracy"] for n in graded], marker="^", label="ground-truth acc. %")
            ax.set_ylabel("%")
            ax.legend()
            made.append(_save(fig, out_dir / "metrics.png"))
    matches = [(f"{k} (judge)", v) for k, v in data.get("pairwise", {}).items()]
    matches += [(f"{k} (grader)", v) for k, v in data["head_to_head"].items()]
    if matches:
        fig, ax = plt.subplots(figsize=(6, 0.9 + 0.45 * len(matches)))
        left = [0.0] * len(matches)
        for key, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            vals = [0.0 if math.isnan(v[key]) else v[key] for _, v in matches]
            ax.barh([m for m, _ in matches], vals, left=left, color=color, label=f"{key} %")
            left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of prompts")
        ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        made.append(_save(fig, out_dir / "head_to_head.png"))
    return made


def _save(fig, path: Path) -> str:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    tmp.replace(path)
    return path.name


def render(run_dir: Path, data: dict, plots: list[str], cfg: LoopConfig | None) -> str:
    lines = [f"# Self-rewarding run: {run_dir.name}", ""]
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        lines += [f"config hash `{m['config_hash']}`, code `{m['code_version']}`, seed {m['seed']}"
                  + (f", wall time {m['wall_s']:.0f} s" if m.get("wall_s") else ""), ""]
    if data["seed"]:
        lines += ["Seed data: " + ", ".join(f"{k} {v}" for k, v in data["seed"].items()), ""]
    if data["eft"]:
        lines += ["EFT builder: " + ", ".join(f"{k} {v}" for k, v in data["eft"].items()), ""]
    for name, s in data["sft"].items():
        if s:
            lines.append(f"SFT {name}: {s['examples']} examples, {s['steps']} steps, loss "
                         f"{_fmt(s['first_loss'])} -> {_fmt(s['last_loss'])}")
    lines.append("")
    for it in data["iterations"]:
        t = it["t"]
        lines += [f"## Iteration {t}: AIFT(M{t}) -> M{t + 1}", "", "| quantity | value |", "|---|---|"]
        rows = []
        if it["1_prompts"]:
            p = it["1_prompts"]
            rows += [("new prompts (kept / tried)", f"{p['prompts']} / {p['attempts']}"),
                     ("prompt filter drops", ", ".join(f"{k} {v}" for k, v in p["filtered"].items()) or "-")]
        if it["2_responses"]:
            r = it["2_responses"]
            rows += [("responses", r["responses"]), ("mean response tokens", _fmt(r["mean_tokens"], 1)),
                     ("truncated responses", r["truncated"])]
        if it["3_judgments"]:
            j = it["3_judgments"]
            rows += [("judgments", j["judgments"]), ("judge parse rate", _fmt(j["parse_rate"])),
                     ("score histogram", " ".join(f"{k}:{v}" for k, v in j["histogram"].items())),
                     ("responses with no valid score", j["responses_without_score"])]
        if it["4_pairs"]:
            p = it["4_pairs"]
            rows += [("pairs built", p["pairs"]),
                     ("prompts dropped", ", ".join(f"{k} {v}" for k, v in p["dropped"].items()) or "none"),
                     ("mean chosen / rejected score", f"{_fmt(p['mean_chosen_score'])} / {_fmt(p['mean_rejected_score'])}"),
                     ("chosen longer than rejected", _fmt(p["chosen_longer_frac"]))]
        if it["6_dpo"]:
            d = it["6_dpo"]
            rows += [("DPO", d.get("skipped") or f"{d['steps']} steps, loss {_fmt(d['first_loss'])} -> "
                      f"{_fmt(d['last_loss'])}")]
            last = d.get("last_metrics") or {}
            if "rewards/accuracies" in last:
                rows.append(("DPO reward accuracy (last step)", _fmt(last["rewards/accuracies"])))
        lines += [f"| {k} | {v} |" for k, v in rows] + [""]
    if data["evals"]:
        lines += ["## Evaluation", "", "| model | mean tokens | pairwise acc. % | 5-best % | exact match % | Spearman "
                  "| Kendall tau | judge parse rate | ground-truth score | ground-truth acc. % |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in data["evals"].items():
            rm, gr = e.get("reward_model") or {}, e.get("grader") or {}
            lines.append(f"| {name} | {_fmt(e['length']['mean_tokens'], 1)} | {_fmt(rm.get('pairwise_accuracy'), 1)} "
                         f"| {_fmt(rm.get('five_best'), 1)} | {_fmt(rm.get('exact_match'), 1)} "
                         f"| {_fmt(rm.get('spearman'))} | {_fmt(rm.get('kendall_tau'))} | {_fmt(rm.get('parse_rate'))} "
                         f"| {_fmt(gr.get('mean_score'), 2)} | {_fmt(gr.get('accuracy'), 1)} |")
        lines.append("")
    if data.get("pairwise"):
        lines += ["## Head to head (pairwise judge, both orders, disagreement = tie)", "",
                  "| match | judge | win % | tie % | loss % | prompts | unparsable judgments | orders disagree "
                  "| too long for the judge | first-position rate |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in data["pairwise"].items():
            lines.append(f"| {k} | {v['judge']} | {_fmt(v['win'], 1)} | {_fmt(v['tie'], 1)} | {_fmt(v['loss'], 1)} "
                         f"| {v['num_prompts']} | {v['unparsable']} / {v['judgments']} | {v['inconsistent']} "
                         f"| {v['too_long']} | {_fmt(v['first_position_rate'], 2)} |")
        lines.append("")
    if data["head_to_head"]:
        lines += ["## Head to head (ground-truth grader: pointwise and deterministic, so one verdict per prompt; "
                  "presentation order cannot matter)", "",
                  "| match | win % | tie % | loss % | prompts |", "|---|---|---|---|---|"]
        for k, v in data["head_to_head"].items():
            lines.append(f"| {k} | {_fmt(v['win'], 1)} | {_fmt(v['tie'], 1)} | {_fmt(v['loss'], 1)} | {v['num_prompts']} |")
        lines.append("")
    limits = _context_limits(run_dir)
    if limits:
        lines += ["## Inputs over the context", ""] + [f"- {k}: {v}" for k, v in limits.items()] + [""]
    lines += [f"![{p}](plots/{p})" for p in plots]
    return "\n".join(lines) + "\n"


def _context_limits(run_dir: Path) -> dict[str, str]:
    """stage -> what did not fit the context: requests skipped by generation, training examples cut."""
    out = {}
    for f in sorted(run_dir.rglob("done.json")):
        s = json.loads(f.read_text())
        parts = [f"{n} skipped ({name})" for name, n in (s.get("overlong_skipped") or {}).items()]
        if s.get("truncated_examples"):
            parts.append(f"{s['truncated_examples']} training examples cut prompt-side to fit")
        if parts:
            out[str(f.parent.relative_to(run_dir))] = ", ".join(parts)
    return out


def write_report(run_dir: Path, cfg: LoopConfig | None = None) -> Path:
    run_dir = Path(run_dir)
    data = collect(run_dir)
    plots = _plots(run_dir, data)
    path = run_dir / "report.md"
    atomic_write_text(path, render(run_dir, data, plots, cfg))
    atomic_write_text(run_dir / "report.json", json.dumps(data, indent=2, default=str) + "\n")
    return path


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1])))
