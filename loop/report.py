"""report.md, report.json and PNG plots for a run directory, from the finished stages' artifacts alone.

    python -m loop.report RUN_DIR

Because it reads nothing but what finished stages left on disk (done.json summaries, the pairs, the
responses' lengths, the response scores) and the run's own config snapshot (manifest.json), it rebuilds
the report of any run, finished or not, without loading a model; a section without data says so in one
line. Markdown lives in report_render.py, plots in report_plots.py.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

from .config import LoopConfig
from .records import RecordError, atomic_write_text, iter_jsonl, read_jsonl
from .report_render import render
from .stage_eval import head_to_head_from_grades
from .stages import DONE, PARTIAL, F
from . import stages as S

# An iteration's stages by folder name (also the keys of its report data); the meta-judge reports itself
# (loop/meta_judge.py: report_lines).
AIFT_STAGES = tuple(s.name for s in (S.PROMPTS, S.RESPONSES, S.JUDGMENTS, S.PAIRS, S.REF_LOGPROBS, S.DPO))
SELECT_STAGE = S.SELECT.name  # written by every finished iteration (loop/checkpoint_select.py); older runs lack it
# What makes a folder a run directory: the manifest, or any stage folder, done or in progress.
_RUN_MARKERS = ("manifest.json", S.SEED.name, S.SEED.name + PARTIAL, S.M0.name, S.M0.name + PARTIAL, S.SFT.name,
                S.iteration_dir(1), S.EVAL.name)
MEAN_BUCKETS = [f"{k / 2:g}" for k in range(11)]  # response mean scores to the nearest 0.5: "0" .. "5"


class ReportError(ValueError):
    """The directory cannot be reported on; one line naming the file (and line) at fault."""


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ReportError(f"{path}:1: expected a JSON object, got {type(obj).__name__}")
    return obj


def _summary(stage: Path) -> dict | None:
    return _read_json(stage / DONE)


def _dig(tree, *keys):
    for k in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(k)
    return tree


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pair_stats(it_dir: Path) -> dict:
    """Chosen vs rejected of one iteration's pairs (the actor's: judge pairs mixed in by the meta-judge
    are judgments, not responses): scores, their gap, lengths in tokens."""
    path = it_dir / S.PAIRS.name / F.PAIRS
    pairs = []
    for lineno, p in iter_jsonl(path, ("id",)):
        if p.get("kind", "actor") != "actor":
            continue
        missing = [k for k in ("chosen_id", "rejected_id", "chosen_score", "rejected_score") if k not in p]
        if missing:
            raise RecordError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        pairs.append(p)
    tokens = {}
    if (it_dir / S.RESPONSES.name / DONE).exists():
        tokens = {r["id"]: r["num_tokens"] for r in read_jsonl(it_dir / S.RESPONSES.name / F.RESPONSES,
                                                               ("id", "num_tokens"))}
    chosen = [tokens[p["chosen_id"]] for p in pairs if p["chosen_id"] in tokens]
    rejected = [tokens[p["rejected_id"]] for p in pairs if p["rejected_id"] in tokens]
    longer = [tokens[p["chosen_id"]] > tokens[p["rejected_id"]] for p in pairs
              if p["chosen_id"] in tokens and p["rejected_id"] in tokens]
    return {"pairs": len(pairs), "mean_chosen_score": _mean([p["chosen_score"] for p in pairs]),
            "mean_rejected_score": _mean([p["rejected_score"] for p in pairs]),
            "mean_gap": _mean([p["chosen_score"] - p["rejected_score"] for p in pairs]),
            "mean_chosen_tokens": _mean(chosen), "mean_rejected_tokens": _mean(rejected),
            "chosen_longer_pct": 100.0 * sum(longer) / len(longer) if longer else None,
            "mean_response_tokens": _mean(list(tokens.values()))}


def _mean_score_histogram(scores_path: Path) -> dict[str, int]:
    """Responses per mean self-judged score, to the nearest 0.5 ("none": no parsable judgment)."""
    hist = {b: 0 for b in MEAN_BUCKETS + ["none"]}
    for s in read_jsonl(scores_path, ("id", "mean")):
        m = s["mean"]
        hist["none" if m is None else MEAN_BUCKETS[min(10, max(0, math.floor(2 * m + 0.5)))]] += 1
    return hist


def _iteration(run_dir: Path, t: int) -> dict:
    d = run_dir / S.iteration_dir(t)
    it = {"t": t, **{name: _summary(d / name) for name in AIFT_STAGES + (SELECT_STAGE,)}}
    it["unfinished"] = {name: "in progress" if (d / f"{name}{PARTIAL}").exists() else "not started"
                        for name in AIFT_STAGES if it[name] is None}
    if (d / f"{SELECT_STAGE}{PARTIAL}").exists() and it[SELECT_STAGE] is None:
        it["unfinished"][SELECT_STAGE] = "in progress"
    it["pair_stats"] = _pair_stats(d) if it[S.PAIRS.name] is not None else None
    it["mean_scores"] = (_mean_score_histogram(S.JUDGMENTS.path(run_dir, F.SCORES, t))
                         if it[S.JUDGMENTS.name] is not None else None)
    return it


def _win_rates(evals: dict, pairwise: dict, h2h: dict) -> list[dict]:
    """One row per match: iteration k produced M{k+1} (k = 0: M1, the SFT model), who it played, which judge."""
    rows = []
    for judge, matches in (("pairwise judge", pairwise), ("ground-truth grader", h2h)):
        for key, v in matches.items():
            model, opp = key.split(" vs ")
            if not model[1:].isdigit():
                continue
            k = int(model[1:]) - 1
            rows.append({"iteration": k, "model": model, "opponent": opp, "judge": judge,
                         "against": "sft_baseline" if opp == "sft_baseline" else "previous",
                         **{x: v.get(x) for x in ("win", "tie", "loss", "num_prompts")}})
    return sorted(rows, key=lambda r: (r["judge"], r["against"], r["iteration"]))


def _meta_judge_lines(run_dir: Path) -> list[str] | None:
    """loop/meta_judge.py's report_lines(run_dir), when that module and function exist."""
    try:
        meta_judge = importlib.import_module("loop.meta_judge")
    except ModuleNotFoundError as e:
        if e.name != "loop.meta_judge":
            raise
        return None
    fn = getattr(meta_judge, "report_lines", None)
    if fn is None:
        return None
    try:
        return [str(line) for line in fn(run_dir)]
    except Exception as e:  # noqa: BLE001 - one section must not cost the whole report (it runs at a run's end)
        first = (str(e).splitlines() or [""])[0]
        return [f"meta-judge summary unavailable: {type(e).__name__}: {first}"]


def _config_facts(config: dict | None) -> dict | None:
    """What the report says about sections a run has no data for (eval off, iterations still to come)."""
    if not config:
        return None
    return {"iterations": _dig(config, "run", "iterations"), "eval_enabled": _dig(config, "eval", "enabled"),
            "judge_mode": _dig(config, "judge", "mode")}


def _context_limits(run_dir: Path) -> dict[str, str]:
    """stage -> what did not fit the context: requests skipped by generation, training examples cut."""
    out = {}
    for f in sorted(run_dir.rglob(DONE)):
        if any(part.endswith(PARTIAL) for part in f.relative_to(run_dir).parts):
            continue  # a stage in progress: its numbers are not final
        s = _read_json(f)
        parts = [f"{n} skipped ({name})" for name, n in (s.get("overlong_skipped") or {}).items()]
        if s.get("truncated_examples"):
            parts.append(f"{s['truncated_examples']} training examples cut prompt-side to fit")
        if parts:
            out[str(f.parent.relative_to(run_dir))] = ", ".join(parts)
    return out


def collect(run_dir: Path, config: dict | None = None) -> dict:
    """Everything the report shows, read from run_dir; config: the run's config as a dict (default: the
    copy in manifest.json). Raises ReportError / RecordError naming the file at fault."""
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / "manifest.json")
    iters, t = [], 1
    while (run_dir / S.iteration_dir(t)).is_dir():
        iters.append(_iteration(run_dir, t))
        t += 1
    models = ["sft_baseline"] + [f"M{k}" for k in range(1, len(iters) + 2)]
    evals = {m: _summary(S.EVAL.folder(run_dir, m)) for m in models}
    evals = {m: e for m, e in evals.items() if e is not None}
    h2h = {}
    for m in evals:
        if m == "sft_baseline":
            continue
        k = int(m[1:])
        for other in ("sft_baseline", f"M{k - 1}"):
            a, b = S.EVAL.path(run_dir, F.GRADES, m), S.EVAL.path(run_dir, F.GRADES, other)
            if other in evals and a.exists() and b.exists():
                h2h[f"{m} vs {other}"] = head_to_head_from_grades(a, b)
    pairwise = {f"{m} vs {opp}": v for m, e in evals.items() for opp, v in (e.get("pairwise") or {}).items()}
    return {"iterations": iters, "evals": evals, "head_to_head": h2h, "pairwise": pairwise,
            "win_rates": _win_rates(evals, pairwise, h2h),
            "sft": {n: _summary(S.SFT.folder(run_dir, n)) for n in ("sft_baseline", "M1")},
            "eft": _summary(S.EFT.folder(run_dir)), "seed": _summary(S.SEED.folder(run_dir)),
            "m0": _summary(S.M0.folder(run_dir)),
            "manifest": {k: v for k, v in (manifest or {}).items() if k != "config"} or None,
            "config": _config_facts(config if config is not None else _dig(manifest, "config")),
            "context_limits": _context_limits(run_dir), "meta_judge": _meta_judge_lines(run_dir)}


def write_report(run_dir: Path, cfg: LoopConfig | None = None) -> Path:
    """Rebuild run_dir/report.md, report.json and plots/*.png (each written atomically). cfg: the live run's
    config (the loop passes it); None: the run dir's stored copy. Everything is read before anything is
    written, so bad input leaves the previous report in place."""
    from .report_plots import make_plots

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory")
    if not any((run_dir / m).exists() for m in _RUN_MARKERS):
        raise ReportError(f"{run_dir}: not a run directory (no manifest.json and no stage folder: seed/, m0/, "
                          "iter_1/, eval/)")
    data = collect(run_dir, cfg.to_dict() if cfg is not None else None)
    plots = make_plots(run_dir, data)
    atomic_write_text(run_dir / "report.json", json.dumps(data, indent=2, default=str) + "\n")
    path = run_dir / "report.md"
    atomic_write_text(path, render(run_dir, data, plots, cfg))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loop.report",
                                 description="Rebuild RUN_DIR/report.md, report.json and plots/ from a run "
                                             "directory (finished or not).")
    ap.add_argument("run_dir", type=Path, help="the run directory (run.run_dir)")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except (ReportError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
