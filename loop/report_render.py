"""report.md from the data loop/report.py collects: one section per question, each saying in one line
when the run has no data for it yet. Summaries are read with .get: a done.json from an older run, or
a stage written by a newer one, renders with "-" in place of a missing number instead of failing."""
from __future__ import annotations

import math
from pathlib import Path

from . import stages as S

SCORES = ["0", "1", "2", "3", "4", "5"]


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _counts(d) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items())


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""])


class _Plots:
    """The plot files made for this report; each section embeds its own, the rest go at the end."""

    def __init__(self, names: list[str]):
        self.left = list(names)

    def embed(self, *names: str) -> list[str]:
        out = []
        for n in names:
            if n in self.left:
                self.left.remove(n)
                out.append(f"![{n}](plots/{n})")
        return out + [""] if out else []


def _header(run_dir: Path, data: dict) -> list[str]:
    lines = [f"# Self-rewarding run: {run_dir.name}", ""]
    m = data.get("manifest")
    if m:
        # No "not finished" without wall_s: the loop writes its report just before it marks the run finished.
        lines += [f"config hash `{m.get('config_hash')}`, code `{m.get('code_version')}`, seed {m.get('seed')}"
                  + (f", wall time {m['wall_s']:.0f} s" if m.get("wall_s") else ""), ""]
    else:
        lines += ["No manifest.json: which config and code made this run is unknown.", ""]
    facts = ["Seed data: " + (_counts(data["seed"]) if data["seed"] is not None else "not built yet")]
    if data["eft"] is not None:
        facts.append("EFT builder: " + _counts(data["eft"]))
    facts.append("M0: " + (_fmt(data["m0"].get("checkpoint")) if data.get("m0") is not None else "not ready yet"))
    trained = [(n, s) for n, s in data["sft"].items() if s is not None]
    facts += [f"SFT {name}: {_fmt(s.get('examples'))} examples, {_fmt(s.get('steps'))} steps, loss "
              f"{_fmt(s.get('first_loss'))} -> {_fmt(s.get('last_loss'))}" for name, s in trained]
    if not trained:
        facts.append("SFT: no model trained yet")
    return lines + [f"- {f}" for f in facts] + [""]


def _iteration(it: dict) -> list[str]:
    t = it["t"]
    lines = [f"## Iteration {t}: AIFT(M{t}) -> M{t + 1}", ""]
    rows = []
    if it[S.PROMPTS.name] is not None:
        p = it[S.PROMPTS.name]
        rows += [("new prompts (kept / tried)", f"{_fmt(p.get('prompts'))} / {_fmt(p.get('attempts'))}"),
                 ("prompt filter drops", _counts(p.get("filtered")) or "-")]
    if it[S.RESPONSES.name] is not None:
        r = it[S.RESPONSES.name]
        rows += [("responses", _fmt(r.get("responses"))), ("mean response tokens", _fmt(r.get("mean_tokens"), 1)),
                 ("truncated responses", _fmt(r.get("truncated")))]
    if it[S.JUDGMENTS.name] is not None:
        j = it[S.JUDGMENTS.name]
        rows += [("judgments", _fmt(j.get("judgments"))), ("judge parse rate", _fmt(j.get("parse_rate"))),
                 ("score histogram", " ".join(f"{k}:{v}" for k, v in (j.get("histogram") or {}).items()) or "-"),
                 ("responses with no valid score", _fmt(j.get("responses_without_score")))]
    if it[S.PAIRS.name] is not None:
        p = it[S.PAIRS.name]
        rows += [("pairs built", _fmt(p.get("pairs"))), ("prompts dropped", _counts(p.get("dropped")) or "none"),
                 ("mean chosen / rejected score",
                  f"{_fmt(p.get('mean_chosen_score'))} / {_fmt(p.get('mean_rejected_score'))}"),
                 ("chosen longer than rejected", _fmt(p.get("chosen_longer_frac")))]
    if it[S.DPO.name] is not None:
        d = it[S.DPO.name]
        rows += [("DPO", d.get("skipped") or f"{_fmt(d.get('steps'))} steps, loss {_fmt(d.get('first_loss'))} -> "
                  f"{_fmt(d.get('last_loss'))}")]
        last = d.get("last_metrics") or {}
        if "rewards/accuracies" in last:
            rows.append(("DPO reward accuracy (last step)", _fmt(last["rewards/accuracies"])))
    if it.get(S.SELECT.name) is not None:
        rows.append((f"M{t + 1} checkpoint (selection)", _fmt(it[S.SELECT.name].get("chosen"))))
    if rows:
        lines += ["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if it["unfinished"]:
        lines += ["Not finished: " + ", ".join(f"{n} ({state})" for n, state in it["unfinished"].items()) + ".", ""]
    return lines


def _iterations(data: dict) -> list[str]:
    iters = data["iterations"]
    planned = (data.get("config") or {}).get("iterations")
    if not iters:
        return ["## Iterations", "", "No AIFT iteration started yet" + (f" (of {planned} planned)." if planned else
                                                                       "."), ""]
    lines = [x for it in iters for x in _iteration(it)]
    if isinstance(planned, int) and planned > len(iters):
        rest = f"{len(iters) + 1}" + (f"-{planned}" if planned > len(iters) + 1 else "")
        lines += [f"Iteration {rest} of {planned}: not started yet.", ""]
    return lines


def _pairs(data: dict, plots: _Plots) -> list[str]:
    lines = ["## Preference pairs per iteration", ""]
    rows = [(it["t"], it["pair_stats"]) for it in data["iterations"] if it.get("pair_stats")]
    if not rows:
        return lines + [f"No preference pairs yet: no {S.iteration_dir('t')}/{S.PAIRS.name} stage has finished.", ""]
    lines += ["Self-judged mean scores of the chosen and rejected response of each pair and their gap; lengths in "
              "tokens (all responses: every sampled response of the iteration).", ""]
    lines += _table(["iteration", "pairs", "mean chosen score", "mean rejected score", "mean gap",
                     "mean chosen tokens", "mean rejected tokens", "chosen more tokens %",
                     "mean tokens, all responses"],
                    [[t, s["pairs"], _fmt(s["mean_chosen_score"]), _fmt(s["mean_rejected_score"]),
                      _fmt(s["mean_gap"]), _fmt(s["mean_chosen_tokens"], 1), _fmt(s["mean_rejected_tokens"], 1),
                      _fmt(s["chosen_longer_pct"], 1), _fmt(s["mean_response_tokens"], 1)] for t, s in rows])
    return lines + plots.embed("pairs.png")


def _scores(data: dict, plots: _Plots) -> list[str]:
    lines = ["## Self-judged scores per iteration", ""]
    judged = [it for it in data["iterations"] if it[S.JUDGMENTS.name] is not None]
    if not judged:
        return lines + [f"No judgments yet: no {S.iteration_dir('t')}/{S.JUDGMENTS.name} stage has finished.", ""]
    mode = (data.get("config") or {}).get("judge_mode")
    how = {"expected": "the expected score under the judge, rounded",
           "sampled": "the parsed \"Score: n\", rounded; unparsable: none found",
           "vote": "judge.mode=vote, no LLM judge: 5 x the share of the prompt's responses giving the same answer, "
                   "rounded (loop/vote.py)"}.get(mode, "rounded")
    lines += [f"Every judgment ({'one per response' if mode == 'vote' else 'K per response'}; {how}):", ""]
    lines += _table(["iteration"] + SCORES + ["unparsable", "judgments"],
                    [[it["t"]] + [(it[S.JUDGMENTS.name].get("histogram") or {}).get(k, 0) for k in SCORES]
                     + [(it[S.JUDGMENTS.name].get("histogram") or {}).get("none", 0),
                        _fmt(it[S.JUDGMENTS.name].get("judgments"))] for it in judged])
    means = [it for it in judged if it.get("mean_scores")]
    if means:
        buckets = [k for k in means[0]["mean_scores"] if k != "none"]
        lines += ["Responses by their mean score (to the nearest 0.5; none: no parsable judgment, no pair):", ""]
        lines += _table(["iteration"] + buckets + ["none", "responses"],
                        [[it["t"]] + [it["mean_scores"][k] for k in buckets]
                         + [it["mean_scores"]["none"], sum(it["mean_scores"].values())] for it in means])
    return lines + plots.embed("score_distribution.png")


def _outcome(c: dict, count: str, pct: str) -> str:
    """A candidate's wins as a count of prompts ("wins") or a share in % ("win"), whichever the stage wrote."""
    return _fmt(c[count]) if count in c else f"{_fmt(c[pct], 1)} %" if pct in c else "-"


def _selection(data: dict) -> list[str]:
    iters = [it for it in data["iterations"] if it.get(S.SELECT.name) is not None or S.SELECT.name in it["unfinished"]]
    if not iters:
        return []
    lines = ["## Checkpoint selection", ""]
    for it in iters:
        t, s = it["t"], it.get(S.SELECT.name)
        if s is None:
            lines += [f"Iteration {t}: in progress.", ""]
            continue
        if s.get("disabled"):
            lines += [f"Iteration {t}: selection off; M{t + 1} = the {s.get('chosen', 'last')} checkpoint.", ""]
            continue
        lines += [f"Iteration {t}: M{t + 1} = {_fmt(s.get('chosen'))}, candidates judged against "
                  f"{_fmt(s.get('against'))} by {_fmt(s.get('judge'))} on {_fmt(s.get('prompts'))} prompts.", ""]
        rows = []
        for c in s.get("candidates") or []:
            rows.append([_fmt(c.get("checkpoint")), _fmt(c.get("step")), _outcome(c, "wins", "win"),
                         _outcome(c, "ties", "tie"), _outcome(c, "losses", "loss"), _fmt(c.get("win_rate")),
                         "yes" if c.get("checkpoint") == s.get("chosen") else ""])
        lines += _table(["checkpoint", "step", "win", "tie", "loss", "win rate", "chosen"], rows) if rows else [
            "No candidates listed.", ""]
    return lines


def _evaluation(data: dict, plots: _Plots) -> list[str]:
    lines = ["## Evaluation", ""]
    if not data["evals"]:
        off = (data.get("config") or {}).get("eval_enabled") is False
        return lines + ["Evaluation off (eval.enabled: false): no model evaluated." if off else
                        "No model evaluated yet: no eval/<model> stage has finished.", ""]
    lines += ["| model | mean tokens | pairwise acc. % | 5-best % | exact match % | Spearman "
              "| Kendall tau | judge parse rate | ground-truth score | ground-truth acc. % |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in data["evals"].items():
        rm, gr = e.get("reward_model") or {}, e.get("grader") or {}
        lines.append(f"| {name} | {_fmt((e.get('length') or {}).get('mean_tokens'), 1)} "
                     f"| {_fmt(rm.get('pairwise_accuracy'), 1)} | {_fmt(rm.get('five_best'), 1)} "
                     f"| {_fmt(rm.get('exact_match'), 1)} | {_fmt(rm.get('spearman'))} "
                     f"| {_fmt(rm.get('kendall_tau'))} | {_fmt(rm.get('parse_rate'))} "
                     f"| {_fmt(gr.get('mean_score'), 2)} | {_fmt(gr.get('accuracy'), 1)} |")
    return lines + [""] + _self_pairs(data) + plots.embed("lengths.png", "metrics.png")


def _self_pairs(data: dict) -> list[str]:
    """Does each model's judge order its own sampled responses as the grader does (loop/self_pairs.py)?"""
    rows = []
    for name, e in data["evals"].items():
        sp = e.get("self_pairs")
        if sp:
            rows.append([name, _fmt(sp.get("accuracy"), 1), _fmt(sp.get("agree")), _fmt(sp.get("disagree")),
                         _fmt(sp.get("tie")), _fmt(sp.get("num_pairs")), _fmt(sp.get("prompts")),
                         _fmt(sp.get("prompts_with_pair"), 1), _fmt(sp.get("unscored")),
                         _fmt((sp.get("vote") or {}).get("accuracy"), 1),
                         _fmt((sp.get("sampled_grader") or {}).get("accuracy"), 1)])
    if not rows:
        return []
    return ["Self-pair accuracy: on held-out prompts each model samples responses and judges them as AIFT "
            "stages 2-3 do; over the pairs of one prompt's responses the grader scores differently, the share the "
            "judge orders as the grader does (a tie counts half, so 50 is chance). The vote column scores the same "
            "responses by self-consistency (judge.mode=vote: the share of the prompt's responses giving the same "
            "answer). The last column is the grader's exact-correct share of those sampled responses (the policy at "
            "the sampling temperature; the table above is greedy).", ""] + _table(
        ["model", "self-pair acc. %", "agree", "disagree", "tie", "pairs", "prompts", "prompts with a pair %",
         "unscored responses", "vote self-pair acc. %", "sampled ground-truth acc. %"], rows)


def _win_rates(data: dict, plots: _Plots) -> list[str]:
    lines = ["## Win rate per iteration", ""]
    if not data.get("win_rates"):
        return lines + ["No head to head yet: no model has been evaluated against the SFT baseline or its "
                        "predecessor.", ""]
    lines += ["Win / tie / loss of the model each iteration produced (0: M1 after SFT, t: M(t+1) after iteration "
              "t's DPO) against the SFT baseline and against its predecessor.", ""]
    return lines + plots.embed("win_rate.png")


def _head_to_head(data: dict, plots: _Plots) -> list[str]:
    lines = []
    if data.get("pairwise"):
        lines += ["## Head to head (pairwise judge, both orders, disagreement = tie)", "",
                  "| match | judge | win % | tie % | loss % | prompts | unparsable judgments | orders disagree "
                  "| too long for the judge | first-position rate |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in data["pairwise"].items():
            lines.append(f"| {k} | {_fmt(v.get('judge'))} | {_fmt(v.get('win'), 1)} | {_fmt(v.get('tie'), 1)} "
                         f"| {_fmt(v.get('loss'), 1)} | {_fmt(v.get('num_prompts'))} | {_fmt(v.get('unparsable'))} / "
                         f"{_fmt(v.get('judgments'))} | {_fmt(v.get('inconsistent'))} | {_fmt(v.get('too_long'))} "
                         f"| {_fmt(v.get('first_position_rate'), 2)} |")
        lines.append("")
    if data["head_to_head"]:
        lines += ["## Head to head (ground-truth grader: pointwise and deterministic, so one verdict per prompt; "
                  "presentation order cannot matter)", "",
                  "| match | win % | tie % | loss % | prompts |", "|---|---|---|---|---|"]
        for k, v in data["head_to_head"].items():
            lines.append(f"| {k} | {_fmt(v['win'], 1)} | {_fmt(v['tie'], 1)} | {_fmt(v['loss'], 1)} "
                         f"| {v['num_prompts']} |")
        lines.append("")
    return lines + (plots.embed("head_to_head.png") if lines else [])


def _context(data: dict) -> list[str]:
    out = [f"- {stage}: {what}" for stage, what in (data.get("context_limits") or {}).items()]
    return ["## Inputs over the context", ""] + (out or ["Every input fit: no finished stage skipped a request "
                                                         "or cut a training example."]) + [""]


def render(run_dir: Path, data: dict, plots: list[str], cfg=None) -> str:
    """The report's markdown; cfg is unused (kept for callers): what it would say is in data["config"]."""
    run_dir = Path(run_dir)
    figs = _Plots(plots)
    lines = (_header(run_dir, data) + _iterations(data) + _pairs(data, figs) + _scores(data, figs)
             + _selection(data) + _evaluation(data, figs) + _win_rates(data, figs) + _head_to_head(data, figs)
             + _context(data))
    meta = data.get("meta_judge")
    if meta:  # loop/meta_judge.py's lines, under their own "## Meta-judge ..." heading when they bring one
        lines += ([] if meta[0].startswith("## Meta-judge") else ["## Meta-judge", ""]) + meta + [""]
    lines += figs.embed(*figs.left)
    return "\n".join(lines).rstrip("\n") + "\n"
