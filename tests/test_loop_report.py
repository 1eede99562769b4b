"""`python -m loop.report RUN_DIR` on small run directories shaped as the stages write them: the stage
folders go through StageDir, the manifest through loop/manifest.py, pairs through the real make_pairs,
and the judge / eval / pairwise summaries through the functions the stages use (score_histogram,
mean_score, length_stats, reward_model_metrics, match_summary). A full run, one killed in iteration 2,
one without evaluation, one with only seed data and M0, an empty directory and a broken done.json.
Two cases go through a subprocess (`python -m loop.report`); the rest call its main() in-process."""
import dataclasses
import json
import pathlib
import subprocess
import sys
import types

import torch
from PIL import Image

from engine.distributed import Dist
from loop import manifest as M
from loop.config import LoopConfig
from loop.eval import length_stats, reward_model_metrics, score_histogram
from loop.judge import mean_score
from loop.pairwise import match_summary
from loop.records import write_jsonl
from loop.report import collect, main, write_report
from loop.stage_aift import make_pairs
from loop.stage_dir import StageDir

REPO = pathlib.Path(__file__).resolve().parent.parent
DIST = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
EVAL_IDS = ["e1", "e2", "e3", "e4"]

# Per iteration: prompt -> the K=3 judge scores of each of its 4 responses (None: unparsable).
# Response k has 10 * (k + 1) tokens.
JUDGED = {
    1: {"a": [[5, 5, 5], [2, 2, 2], [4, None, 3], [None] * 3], "b": [[5, 5, 5], [2, 2, 2], [4, None, 3], [None] * 3],
        "c": [[None] * 3] * 4},  # c: no scored response -> no pair
    2: {"a": [[4, 4, 4], [5, 5, 5], [4, 5, 4], [4, 4, 5]], "b": [[4, 4, 4], [5, 5, 5], [4, 5, 4], [4, 4, 5]],
        "c": [[5, 5, 5]] * 4},  # c: a tie -> no pair
}


def _stage(path, summary, files=None):
    st = StageDir(path, DIST)
    work = st.begin()
    for name, records in (files or {}).items():
        write_jsonl(work / name, records)
    return st.finish(summary)


def _config(**sections):
    cfg = LoopConfig()
    for section, values in sections.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg


def _iteration(run, t, upto=6, select=None):
    it = run / f"iter_{t}"
    prompts = [{"id": f"it{t}-{p}", "prompt": f"task {p}?"} for p in JUDGED[t]]
    _stage(it / "1_prompts", {"attempts": 5, "prompts": 3, "filtered": {"rouge": 2}}, {"prompts.jsonl": prompts})
    if upto < 2:
        return
    responses = [{"id": f"it{t}-{p}-s{k}", "prompt_id": f"it{t}-{p}", "sample_index": k, "text": "x" * (k + 1),
                  "num_tokens": 10 * (k + 1), "finish_reason": "stop"} for p in JUDGED[t] for k in range(4)]
    if upto == 2:  # killed in the middle of the responses stage
        (it / "2_responses.partial").mkdir(parents=True)
        write_jsonl(it / "2_responses.partial" / "responses.jsonl", responses[:3])
        return
    _stage(it / "2_responses", {"prompts": 3, "responses": 12, "mean_tokens": 25.0, "truncated": 0},
           {"responses.jsonl": responses})
    judgments, scores = [], []
    for p, per_response in JUDGED[t].items():
        for k, ks in enumerate(per_response):
            rid = f"it{t}-{p}-s{k}"
            judgments += [{"id": f"{rid}-s{j}", "target_id": rid, "sample_index": j, "text": f"Score: {s}",
                           "num_tokens": 3, "finish_reason": "stop", "score": s} for j, s in enumerate(ks)]
            scores.append({"id": rid, "prompt_id": f"it{t}-{p}", "scores": ks, "mean": mean_score(ks)})
    all_scores = [j["score"] for j in judgments]
    parsed = sum(s is not None for s in all_scores)
    _stage(it / "3_judgments", {"judgments": len(all_scores), "parsed": parsed, "parse_rate": parsed / len(all_scores),
                                "histogram": score_histogram(all_scores),
                                "responses_without_score": sum(s["mean"] is None for s in scores)},
           {"judgments.jsonl": judgments, "scores.jsonl": scores})
    st = StageDir(it / "4_pairs", DIST)
    work = st.begin()
    st.finish(make_pairs(LoopConfig(), prompts_path=it / "1_prompts" / "prompts.jsonl",
                         responses_path=it / "2_responses" / "responses.jsonl",
                         scores_path=it / "3_judgments" / "scores.jsonl", work=work))
    _stage(it / "5_ref_logprobs", {"pairs": 2, "truncated_examples": 0, "mean_ref_margin": -0.5})
    _stage(it / "6_dpo", {"pairs": 2, "truncated_examples": 0, "steps": 3, "first_loss": 0.69, "last_loss": 0.5,
                          "tokens_per_s": 100.0, "mfu": 0.01, "micro_batch": 2,
                          "last_metrics": {"rewards/accuracies": 0.75}})
    if select is not None:
        _stage(it / "7_select", select)


def _pairwise(model, ab, ba, judge):
    records = [{"id": f"{i}-ab", "prompt_id": i, "order": "ab", "verdict": v} for i, v in zip(EVAL_IDS, ab)]
    records += [{"id": f"{i}-ba", "prompt_id": i, "order": "ba", "verdict": v} for i, v in zip(EVAL_IDS, ba)]
    return {"judge": judge, **match_summary(records, EVAL_IDS)}


def _evaluate(run, model, grades, pairwise=None):
    gens = [{"id": i, "prompt": f"q {i}", "text": "y" * n, "num_tokens": n, "finish_reason": "stop"}
            for i, n in zip(EVAL_IDS, (4, 6, 8, 10))]
    eft = [{"id": f"g{g}-{r}", "group_id": f"g{g}", "rank": r} for g in range(2) for r in range(2)]
    rm = reward_model_metrics(eft, {"g0-0": 5.0, "g0-1": 3.0, "g1-0": 2.0, "g1-1": 4.0})
    summary = {"model": model, "length": length_stats([g["num_tokens"] for g in gens], [g["text"] for g in gens]),
               "truncated": 0, "reward_model": {**rm, "parse_rate": 1.0, "histogram": score_histogram([5, 3, 2, 4])},
               "grader": {"mean_score": sum(grades) / 4, "accuracy": 25.0 * sum(g == 5 for g in grades),
                          "histogram": score_histogram(grades)}}
    if pairwise:
        summary["pairwise"] = pairwise
    _stage(run / "eval" / model, summary, {
        "generations.jsonl": gens,
        "grades.jsonl": [{"id": i, "score": float(s), "correct": s == 5} for i, s in zip(EVAL_IDS, grades)]})


def _seed_and_m0(run, cfg):
    run.mkdir(parents=True)
    M.open_run(run, cfg, resume=False, force_config=False)
    _stage(run / "seed", {"ift": 4, "eft_train": 4, "eft_eval": 4, "eval_prompts": 4})
    _stage(run / "m0", {"checkpoint": "/cache/m0", "tokenizer": "/cache/tok.model", "link": "models/M0"})


def _sft(run, name):
    _stage(run / "sft" / name, {"examples": 8, "truncated_examples": 0, "steps": 2, "first_loss": 3.0,
                                "last_loss": 2.5, "tokens_per_s": 10.0, "mfu": 0.0, "micro_batch": 8,
                                "last_metrics": {}})


SELECT_1 = {"against": "M1", "judge": "M1 (self)", "prompts": 4, "chosen": "step2", "chosen_step": 2, "last_step": 4,
            "candidates": [{"checkpoint": "step2", "step": 2, "win": 50.0, "tie": 25.0, "loss": 25.0, "unparsable": 0,
                            "inconsistent": 1, "win_rate": 0.5},
                           {"checkpoint": "step4", "step": 4, "win": 25.0, "tie": 50.0, "loss": 25.0, "unparsable": 0,
                            "inconsistent": 2, "win_rate": 0.25}]}
SELECT_2 = {"against": "M2", "chosen": "step_40", "prompts": 16, "judge": "M2 (self)",  # counts, a key missing
            "candidates": [{"checkpoint": "step_20", "step": 20, "wins": 5, "ties": 2, "losses": 3, "win_rate": 0.6},
                           {"checkpoint": "step_40", "wins": 7, "ties": 2, "losses": 1, "win_rate": 0.8}]}


def full_run(run, *, iterations=2, kill_in_iteration=None, eval_enabled=True, select=(SELECT_1, SELECT_2)):
    cfg = _config(run={"iterations": iterations}, eval={"enabled": eval_enabled})
    _seed_and_m0(run, cfg)
    _sft(run, "sft_baseline")
    _sft(run, "M1")
    grades = {"sft_baseline": [1, 2, 3, 5], "M1": [2, 2, 3, 5], "M2": [3, 2, 5, 5], "M3": [5, 5, 5, 5]}
    if eval_enabled:
        _evaluate(run, "sft_baseline", grades["sft_baseline"])
        _evaluate(run, "M1", grades["M1"], {"sft_baseline": _pairwise("M1", "AAAA", "BBBB", "M1 (self)")})
    for t in range(1, iterations + 1):
        if t == kill_in_iteration:
            _iteration(run, t, upto=2)
            return run
        _iteration(run, t, select=select[t - 1] if select else None)
        if eval_enabled:
            model, prev = f"M{t + 1}", f"M{t}"
            _evaluate(run, model, grades[model], {"sft_baseline": _pairwise(model, "AAAB", "BBBA", f"{model} (self)"),
                                                  prev: _pairwise(model, "AABC", "BAAC", f"{model} (self)")})
    M.mark_finished(run, json.loads((run / "manifest.json").read_text()), 12.0)
    return run


def _cli(run):
    return subprocess.run([sys.executable, "-m", "loop.report", str(run)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _section(report, heading):
    assert f"## {heading}" in report, heading
    return report.split(f"## {heading}")[1].split("\n## ")[0]


def _rows(section, first_cell):
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith(f"| {first_cell} |")]


def _assert_pngs(run, names):
    for name in names:
        with Image.open(run / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200, name
            im.verify()
    assert not [p.name for p in (run / "plots").iterdir() if p.name.startswith(".")]  # no temp file left


def test_full_run(tmp_path):
    run = full_run(tmp_path / "run")
    proc = _cli(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report.md")
    report = (run / "report.md").read_text()
    # what the report held before (and tests of whole runs read) is still there
    assert "## Iteration 1: AIFT(M1) -> M2" in report and "pairs built" in report and "judge parse rate" in report
    assert "prompts dropped | too_few_scored 1 |" in report and "prompts dropped | tie 1 |" in report
    assert "- M0: /cache/m0" in report and "- SFT M1: 8 examples, 2 steps" in report
    assert ", seed 0, wall time 12 s" in report.split("\n## ")[0]

    pairs = _section(report, "Preference pairs per iteration")
    # iteration 1: chosen = 5 (10 tokens), rejected = 2 (20 tokens); iteration 2: chosen 5 (20), rejected 4 (10)
    assert _rows(pairs, "1") == [["1", "2", "5.000", "2.000", "3.000", "10.0", "20.0", "0.0", "25.0"]]
    assert _rows(pairs, "2") == [["2", "2", "5.000", "4.000", "1.000", "20.0", "10.0", "100.0", "25.0"]]

    scores = _section(report, "Self-judged scores per iteration")
    judgments, means = scores.split("Responses by their mean score")
    # iteration 1: six 5s, six 2s, two 4s, two 3s, 20 unparsable, of 36
    assert _rows(judgments, "1") == [["1", "0", "0", "6", "2", "2", "6", "20", "36"]]
    assert _rows(judgments, "2") == [["2", "0", "0", "0", "0", "14", "22", "0", "36"]]
    # means to the nearest 0.5: iteration 1: 5, 2, 3.5 for a and b, everything else unscored
    assert _rows(means, "1") == [["1"] + ["0"] * 4 + ["2", "0", "0", "2", "0", "0", "2", "6", "12"]]
    # iteration 2: 4, 5, 4.33 -> 4.5 twice for a and b; c all 5: the drift toward 5
    assert _rows(means, "2") == [["2"] + ["0"] * 8 + ["2", "4", "6", "0", "12"]]

    sel = _section(report, "Checkpoint selection")
    assert "Iteration 1: M2 = step2, candidates judged against M1 by M1 (self) on 4 prompts." in sel
    assert _rows(sel, "step2") == [["step2", "2", "50.0 %", "25.0 %", "25.0 %", "0.500", "yes"]]
    assert _rows(sel, "step_20") == [["step_20", "20", "5", "2", "3", "0.600", ""]]
    assert _rows(sel, "step_40") == [["step_40", "-", "7", "2", "1", "0.800", "yes"]]
    assert "| M3 checkpoint (selection) | step_40 |" in report

    pairwise = _section(report, "Head to head (pairwise judge, both orders, disagreement = tie)")
    assert {r[0] for r in _rows(pairwise, "M2 vs M1") + _rows(pairwise, "M3 vs sft_baseline")} == {
        "M2 vs M1", "M3 vs sft_baseline"}
    assert _rows(pairwise, "M2 vs M1")[0][1:5] == ["M2 (self)", "25.0", "50.0", "25.0"]
    graded = _section(report, "Head to head (ground-truth grader")
    assert _rows(graded, "M3 vs M2")[0][1:5] == ["50.0", "50.0", "0.0", "4"]
    assert "![win_rate.png](plots/win_rate.png)" in _section(report, "Win rate per iteration")
    assert "Every input fit" in _section(report, "Inputs over the context")

    pngs = ["score_distribution.png", "pairs.png", "lengths.png", "metrics.png", "head_to_head.png", "win_rate.png"]
    _assert_pngs(run, pngs)
    for name in pngs:
        assert f"![{name}](plots/{name})" in report
    data = json.loads((run / "report.json").read_text())
    rows = {(r["judge"], r["against"], r["iteration"]): r for r in data["win_rates"]}
    assert len(rows) == 2 * 5  # per judge: M1, M2, M3 vs the baseline, M2 vs M1, M3 vs M2
    assert rows["pairwise judge", "previous", 1]["model"] == "M2" and rows["pairwise judge", "previous", 1]["win"] == 25
    assert rows["ground-truth grader", "sft_baseline", 0]["win"] == 25.0  # M1 2 > 1 on e1 only


def test_run_killed_in_iteration_2(tmp_path):
    run = full_run(tmp_path / "run", iterations=3, kill_in_iteration=2)
    assert main([str(run)]) == 0
    report = (run / "report.md").read_text()
    it2 = _section(report, "Iteration 2: AIFT(M2) -> M3")
    assert "| new prompts (kept / tried) | 3 / 5 |" in it2
    assert ("Not finished: 2_responses (in progress), 3_judgments (not started), 4_pairs (not started), "
            "5_ref_logprobs (not started), 6_dpo (not started).") in it2
    assert "Iteration 3 of 3: not started yet." in report
    assert [r[0] for r in _rows(_section(report, "Preference pairs per iteration"), "1")] == ["1"]
    assert not _rows(_section(report, "Preference pairs per iteration"), "2")
    assert "M2 vs M1" in report and "M3" not in _section(report, "Evaluation")
    _assert_pngs(run, ["score_distribution.png", "pairs.png", "win_rate.png"])


def test_run_without_evaluation(tmp_path):
    run = full_run(tmp_path / "run", iterations=1, eval_enabled=False, select=None)
    assert main([str(run)]) == 0
    report = (run / "report.md").read_text()
    # the loop passes its live config; without it the report reads the manifest's copy: the same report
    assert write_report(run, _config(run={"iterations": 1}, eval={"enabled": False})).read_text() == report
    assert _section(report, "Evaluation").strip() == "Evaluation off (eval.enabled: false): no model evaluated."
    assert _section(report, "Win rate per iteration").strip().startswith("No head to head yet")
    assert "## Head to head" not in report and "## Checkpoint selection" not in report
    assert _rows(_section(report, "Preference pairs per iteration"), "1")
    _assert_pngs(run, ["score_distribution.png", "pairs.png"])
    assert not (run / "plots" / "win_rate.png").exists() and not (run / "plots" / "lengths.png").exists()


def test_seed_and_m0_only_says_so_per_section(tmp_path):
    run = tmp_path / "run"
    _seed_and_m0(run, _config(run={"iterations": 3}))
    assert main([str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "- Seed data: eft_eval 4, eft_train 4, eval_prompts 4, ift 4" in report
    assert "- SFT: no model trained yet" in report
    for heading, line in (("Iterations", "No AIFT iteration started yet (of 3 planned)."),
                          ("Preference pairs per iteration", "No preference pairs yet"),
                          ("Self-judged scores per iteration", "No judgments yet"),
                          ("Evaluation", "No model evaluated yet"), ("Win rate per iteration", "No head to head yet"),
                          ("Inputs over the context", "Every input fit")):
        body = _section(report, heading).strip()
        assert body.startswith(line) and len(body.splitlines()) == 1, (heading, body)
    assert not (run / "plots").exists() or not list((run / "plots").iterdir())


def test_empty_or_missing_directory_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli(empty)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "not a run directory" in proc.stderr and str(empty) in proc.stderr
    assert not list(empty.iterdir())  # nothing written
    assert main([str(tmp_path / "nowhere")]) == 2


def test_broken_summary_names_the_file_and_writes_nothing(tmp_path, capsys):
    run = full_run(tmp_path / "run", iterations=1, select=None)
    bad = run / "iter_1" / "4_pairs" / "done.json"
    bad.write_text('{"pairs": 2,\n')
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2: invalid JSON" in err
    assert not (run / "report.md").exists() and not (run / "plots").exists()
    bad.write_text("{}")
    (run / "iter_1" / "4_pairs" / "pairs.jsonl").write_text('{"id": "p1", "chosen_id": "x"}\n')
    assert main([str(run)]) == 2
    assert "pairs.jsonl:1: missing field(s) rejected_id, chosen_score, rejected_score" in capsys.readouterr().err


def test_selection_off_and_missing_keys_render(tmp_path):
    run = full_run(tmp_path / "run", iterations=2, eval_enabled=False,
                   select=({"disabled": True, "chosen": "last"}, {"candidates": [{"checkpoint": "step9"}]}))
    (run / "iter_2" / "3_judgments" / "done.json").write_text("{}")
    report = write_report(run).read_text()
    sel = _section(report, "Checkpoint selection")
    assert "Iteration 1: selection off; M2 = the last checkpoint." in sel
    assert _rows(sel, "step9") == [["step9", "-", "-", "-", "-", "-", ""]]
    assert "| judge parse rate | - |" in _section(report, "Iteration 2: AIFT(M2) -> M3")


def test_meta_judge_section_only_when_the_module_has_report_lines(tmp_path, monkeypatch):
    import loop

    run = full_run(tmp_path / "run", iterations=1, eval_enabled=False, select=None)
    monkeypatch.delattr(loop, "meta_judge", raising=False)
    monkeypatch.setitem(sys.modules, "loop.meta_judge", None)  # absent
    assert collect(run)["meta_judge"] is None and "## Meta-judge" not in write_report(run).read_text()
    module = types.ModuleType("loop.meta_judge")
    monkeypatch.setitem(sys.modules, "loop.meta_judge", module)  # present, no report_lines
    assert "## Meta-judge" not in write_report(run).read_text()
    seen = []
    module.report_lines = lambda run_dir: seen.append(run_dir) or ["- judge agreement: 0.75", "- 3 meta-judgments"]
    section = _section(write_report(run).read_text(), "Meta-judge")
    assert seen[-1] == run and section.strip().splitlines() == ["- judge agreement: 0.75", "- 3 meta-judgments"]

    module.report_lines = lambda run_dir: ["## Meta-judge (judge preference pairs)", "", "| 1 | 3 / 4 |"]
    report = write_report(run).read_text()  # lines that bring their own heading get no second one
    assert report.count("## Meta-judge") == 1 and "## Meta-judge (judge preference pairs)\n\n| 1 | 3 / 4 |" in report

    def broken(run_dir):
        raise KeyError("eval")

    module.report_lines = broken  # its failure is one line in its section, not a lost report
    assert _section(write_report(run).read_text(), "Meta-judge").strip() == (
        "meta-judge summary unavailable: KeyError: 'eval'")
