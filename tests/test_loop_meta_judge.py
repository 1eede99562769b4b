"""Meta-Rewarding's meta-judge stage (loop/meta_judge.py) and the judge pairs' mix into DPO (loop/pairs.py).

Unit tests on hand-made judgments: the strict winner parser, both orders deciding a comparison, win
counting and judge pairs with their drop reasons, the share cap and the mix's determinism, the default
(meta off) pair records unchanged, the report lines. Then one tiny loop with meta.enabled on 2 ranks
(torchrun, gloo, ZeRO-3) through every stage; a copy of it is cut back to the judgments, some
meta-judgments are written into the stage's partial file by hand (the tiny model never writes a
parsable verdict), and the copy resumes on 1 rank: its judge pairs go through reference log-probs and
DPO, and every comparison the model judged again is the 2-rank run's, record for record.
"""
import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import test_loop_dist
import test_loop_run
from loop.config import LoopConfig, LoopConfigError, load_config
from loop.judge import fill_template, load_template
from loop.meta_judge import (DROP_NO_WINNER, DROP_TIED_WINS, STAGE, TIE_NO_VERDICT, TIE_ORDERS_DISAGREE,
                             TIE_TOO_LONG, build_judge_pairs, comparison_id, decide, fill_meta, load_meta_template,
                             meta_template_path, parse_winner, plan_comparisons, report_lines, rubric_of,
                             sft_records)
from loop.pairs import mix_judge_pairs
from loop.records import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, want", [
    ("The first one applies the rubric.\nWinner: Judgement A", "A"),
    ("...\nWinner: Judgement B.", "B"),
    ("winner: judgment b", "B"),  # case and the US spelling are the same verdict
    ("Winner: **Judgement A**", "A"),
    ("Winner: [Judgement B]", "B"),
    ('Winner: "Judgement A"', "A"),
    ("Winner: Judgement A\nbecause it is shorter", None),  # not the end of the judgment
    ("Winner: Judgement A. Winner: Judgement B", None),  # two verdicts
    ("Winner: Judgement A\nWinner: Judgement A", None),  # exactly one "Winner:", even when they agree
    ("Winner: Judgement C", None),
    ("Winner: A", None),
    ("Winner: Judgement A or B", None),
    ("Judgement A is better", None),
    ("", None),
    (None, None),
])
def test_parse_winner_is_strict(text, want):
    assert parse_winner(text) == want


def _j(target, k, score, text=None):
    return {"id": f"{target}-s{k}", "target_id": target, "sample_index": k, "score": score,
            "text": text or f"judgment {k} of {target}", "finish_reason": "stop"}


def _verdicts(plan, picks):
    """Comparison records from {(a_index, b_index): (verdict shown ab, verdict shown ba)} per target."""
    out = {}
    for c in plan:
        got = picks.get((c["target_id"], c["a"]["sample_index"], c["b"]["sample_index"]))
        if got is None:
            continue
        for order, v in zip(("ab", "ba"), got):
            if v != "skip":
                out[comparison_id(c, order)] = {"verdict": v}
    return out


def test_plan_compares_only_disagreeing_parsed_judgments_capped():
    responses = [{"id": r} for r in ("agree", "few", "split", "none")]
    judgments = [_j("agree", 0, 4.0), _j("agree", 1, 4.0), _j("agree", 2, None),
                 _j("few", 0, 3.0), _j("few", 1, None),
                 _j("split", 0, 4.0), _j("split", 1, 4.0), _j("split", 2, 2.0), _j("split", 3, None)]
    plan, counts = plan_comparisons(responses, judgments, max_per_response=2)
    assert counts == Counter(agreeing=1, too_few_parsed=2, disagreeing=1)
    # the pairs that disagree come first; the unparsed judgment never takes part
    assert [(c["a"]["sample_index"], c["b"]["sample_index"]) for c in plan] == [(0, 2), (1, 2)]
    plan, _ = plan_comparisons(responses, judgments, max_per_response=5)
    assert [(c["a"]["sample_index"], c["b"]["sample_index"]) for c in plan] == [(0, 2), (1, 2), (0, 1)]


def test_a_comparison_is_won_only_in_both_orders():
    (c,), _ = plan_comparisons([{"id": "r"}], [_j("r", 0, 5.0), _j("r", 1, 2.0)], 3)
    a, b = c["a"]["id"], c["b"]["id"]
    cases = {("A", "B"): (a, None), ("B", "A"): (b, None),  # shown second in "ba" is a
             ("A", "A"): (None, TIE_ORDERS_DISAGREE),  # always the first shown: position bias cancels
             ("A", None): (None, TIE_NO_VERDICT), (None, None): (None, TIE_NO_VERDICT),
             ("A", "skip"): (None, TIE_TOO_LONG)}
    for got, want in cases.items():
        assert decide(c, _verdicts([c], {("r", 0, 1): got})) == want, got


def test_wins_rank_judgments_into_judge_pairs_with_drop_reasons():
    responses = [{"id": r} for r in ("clear", "cycle", "ties", "half")]
    judgments = [j for r in ("clear", "cycle", "ties") for j in (_j(r, 0, 5.0), _j(r, 1, 3.0), _j(r, 2, 1.0))]
    judgments += [_j("half", 0, 4.0), _j("half", 1, 2.0), _j("half", 2, 2.0)]
    plan, _ = plan_comparisons(responses, judgments, 3)
    picks = {("clear", 0, 1): ("B", "A"), ("clear", 0, 2): ("B", "A"), ("clear", 1, 2): ("A", "B"),  # 1>0, 2>0, 1>2
             ("cycle", 0, 1): ("A", "B"), ("cycle", 1, 2): ("A", "B"), ("cycle", 0, 2): ("B", "A"),  # 0>1>2>0
             ("ties", 0, 1): ("A", "A"), ("ties", 0, 2): (None, "B"), ("ties", 1, 2): ("B", "B"),
             ("half", 0, 1): ("A", "B"), ("half", 0, 2): ("A", "A"), ("half", 1, 2): ("A", "A")}  # 0 > 1 only
    records = _verdicts(plan, picks)
    winners = [decide(c, records)[0] for c in plan]
    prompts = {r["id"]: f"judge prompt of {r['id']}" for r in responses}
    pairs, outcomes, reasons = build_judge_pairs(plan, winners, prompts)
    assert dict(reasons) == {DROP_TIED_WINS: 1, DROP_NO_WINNER: 1}
    got = {p["target_id"]: (p["chosen_id"], p["rejected_id"], p["chosen_wins"], p["rejected_wins"]) for p in pairs}
    # clear: s1 won twice, s0 lost twice; half: s0 won once, s1 lost once (s2: no decisive comparison)
    assert got == {"clear": ("clear-s1", "clear-s0", 2, 0), "half": ("half-s0", "half-s1", 1, 0)}
    clear = next(p for p in pairs if p["target_id"] == "clear")
    assert clear["prompt"] == "judge prompt of clear" and clear["kind"] == "judge"
    assert (clear["chosen"], clear["rejected"]) == ("judgment 1 of clear", "judgment 0 of clear")
    assert (clear["chosen_score"], clear["rejected_score"]) == (3.0, 5.0) and clear["chosen_finished"]
    by = {o["id"]: o for o in outcomes}
    assert by["cycle"]["dropped"] == DROP_TIED_WINS and by["ties"]["dropped"] == DROP_NO_WINNER
    assert by["ties"]["decisive"] == 0
    assert by["cycle"]["judgments"]["cycle-s0"] == {"score": 5.0, "wins": 1, "losses": 1}


def test_expected_mode_judgments_are_shown_with_their_score_and_trained_without_a_stop():
    from loop.meta_judge import shown_judgment

    j = {**_j("r", 0, 3.4567, "counts the numbers "), "score_mode": "expected"}
    assert shown_judgment(j) == "counts the numbers Score: 3.46"
    k = {**_j("r", 1, 1.0), "score_mode": "expected"}
    (c,), _ = plan_comparisons([{"id": "r"}], [j, k], 3)
    (pair,), _, _ = build_judge_pairs([c], [j["id"]], {"r": "p"})
    assert pair["chosen"] == "counts the numbers " and not pair["chosen_finished"]


def test_meta_template_and_rubric():
    template = load_meta_template(meta_template_path("meta_judge.txt"))
    rubric = rubric_of(load_template(REPO / "loop" / "world" / "judge_template.txt"))
    assert "<INSTRUCTION_HERE>" not in rubric and "<RESPONSE_HERE>" not in rubric and "Score: <total points>" in rubric
    text = fill_meta(template, rubric, "Say <RESPONSE_HERE>", "five", "first <JUDGEMENT_B_HERE>", "second")
    assert "Say <RESPONSE_HERE>" in text and "first <JUDGEMENT_B_HERE>" in text  # one pass: no re-substitution
    assert text.index("first") < text.index("second") and text.rstrip().endswith('"Winner: Judgement B".')


def _eft_group(gid, scores):
    return [{"id": f"{gid}-{i}", "group_id": gid, "prompt": f"task {gid}", "response": f"answer {gid}{i}",
             "judgment": f"checks {gid}{i}: yes. Score: {s}", "score": float(s)} for i, s in enumerate(scores)]


def test_meta_sft_records_pair_a_judgment_with_another_scores_judgment():
    from loop.world import World

    template = load_meta_template(meta_template_path("world", World()))
    judge = load_template(World.judge_template_path)
    eft = _eft_group("g1", [5, 3, 3]) + _eft_group("g2", [4, 4]) + _eft_group("g3", [0, 5, 2, 1])
    records = sft_records(eft, template=template, judge_template=judge, n=100, seed=0)
    by_id = {r["id"]: r for r in eft}
    assert len(records) == 7  # g2's two responses scored alike: no wrong judgment for either
    assert sft_records(eft, template=template, judge_template=judge, n=100, seed=0) == records  # deterministic
    assert [r["id"] for r in sft_records(eft, template=template, judge_template=judge, n=3, seed=0)] == \
        [r["id"] for r in records[:3]]
    letters = Counter()
    for rec in records:
        right = by_id[rec["id"].removeprefix("meta-")]
        a = rec["prompt"].split("<judgement_a>")[1].split("</judgement_a>")[0]
        b = rec["prompt"].split("<judgement_b>")[1].split("</judgement_b>")[0]
        letter = rec["response"].rsplit(" ", 1)[1]
        letters[letter] += 1
        shown, other = (a, b) if letter == "A" else (b, a)
        assert shown == right["judgment"] and rec["response"] == f"{right['judgment']}\nWinner: Judgement {letter}"
        wrong = next(r for r in eft if r["judgment"] == other)
        assert wrong["group_id"] == right["group_id"] and wrong["score"] != right["score"]
        assert f"User: {right['prompt']}" in rec["prompt"]
        assert f"<response>{right['response']}</response>" in rec["prompt"]
        assert parse_winner(rec["response"]) == letter  # the target parses as the stage will read it
    assert set(letters) == {"A", "B"}


def test_world_meta_template_needs_the_world_and_sft_examples_are_counts():
    assert load_config(None, ["meta.template=world", "meta.sft_examples=5"]).meta.sft_examples == 5
    with pytest.raises(LoopConfigError, match="meta.sft_examples"):
        load_config(None, ["meta.sft_examples=-1"])
    other = ["meta.template=world", "data.source=jsonl", "data.ift_path=x.jsonl", "model.init=m", "eval.enabled=false"]
    assert load_config(None, other).meta.template == "world"  # unused with meta off
    with pytest.raises(LoopConfigError, match="meta.template"):
        load_config(None, other + ["meta.enabled=true"])


def test_judge_share_is_capped_unless_raised():
    assert LoopConfig().meta.enabled is False and LoopConfig().meta.judge_share <= 0.15
    with pytest.raises(LoopConfigError, match="meta.judge_share .*max_judge_share"):
        load_config(None, ["meta.judge_share=0.3"])
    assert load_config(None, ["meta.judge_share=0.3", "meta.max_judge_share=0.4"]).meta.judge_share == 0.3
    for bad in ("meta.max_judge_share=1.0", "meta.max_comparisons=0", "meta.top_p=0"):
        with pytest.raises(LoopConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def _pairs(kind, n):
    return [{"id": f"{kind}{i}", "prompt": "p", "chosen": "c", "rejected": "r", "chosen_finished": True,
             "rejected_finished": True, "kind": kind} for i in range(n)]


def test_mix_keeps_every_actor_pair_and_a_deterministic_capped_share():
    actor, judge = _pairs("actor", 17), _pairs("judge", 10)
    used, mix = mix_judge_pairs(actor, judge, share=0.15, seed=0)
    assert len(used) == 3 and mix["total_pairs"] == 20 and mix["judge_share_used"] == 0.15  # 3 / (17 + 3)
    assert mix["judge_pairs_over_share"] == 7 and mix["judge_pairs_built"] == 10
    shuffled = judge[:]
    random.Random(1).shuffle(shuffled)
    again, _ = mix_judge_pairs(actor, shuffled, share=0.15, seed=0)
    assert {p["id"] for p in again} == {p["id"] for p in used}  # the subsample ignores file order
    assert [p["id"] for p in used] == [p["id"] for p in judge if p in used]  # in the file's order
    subsets = {frozenset(p["id"] for p in mix_judge_pairs(actor, judge, share=0.15, seed=s)[0]) for s in range(8)}
    assert len(subsets) > 1  # run.seed picks which
    for n_actor in range(0, 40):
        used, mix = mix_judge_pairs(_pairs("actor", n_actor), judge, share=0.15, seed=0)
        assert len(used) <= 0.15 * (n_actor + len(used)) + 1e-12
    assert len(mix_judge_pairs(actor, _pairs("judge", 2), share=0.15, seed=0)[0]) == 2  # fewer built: all of them
    assert mix_judge_pairs(actor, judge, share=0.0, seed=0)[0] == []


def _pair_inputs(tmp_path):
    prompts = [{"id": f"p{i}", "prompt": f"task {i}"} for i in range(3)]
    responses = [{"id": f"p{i}-s{k}", "prompt_id": f"p{i}", "sample_index": k, "text": f"answer {i}{k}",
                  "num_tokens": 2, "finish_reason": "stop"} for i in range(3) for k in range(2)]
    scores = [{"id": r["id"], "mean": float(r["sample_index"] + 1)} for r in responses]
    paths = {}
    for name, rows in (("prompts", prompts), ("responses", responses), ("scores", scores)):
        paths[name] = tmp_path / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths


def test_make_pairs_tags_kinds_only_when_meta_is_on(tmp_path):
    from loop.stage_aift import make_pairs

    paths = _pair_inputs(tmp_path)
    kw = dict(prompts_path=paths["prompts"], responses_path=paths["responses"], scores_path=paths["scores"])
    (tmp_path / "off").mkdir()
    off = make_pairs(LoopConfig(), work=tmp_path / "off", **kw)
    plain = read_jsonl(tmp_path / "off" / "pairs.jsonl")
    assert len(plain) == 3 and all("kind" not in p for p in plain) and "meta" not in off
    judge = tmp_path / "judge_pairs.jsonl"
    write_jsonl(judge, _pairs("judge", 4))
    (tmp_path / "on").mkdir()
    cfg = load_config(None, ["meta.enabled=true", "meta.judge_share=0.4", "meta.max_judge_share=0.5"])
    on = make_pairs(cfg, work=tmp_path / "on", judge_pairs_path=judge, **kw)
    mixed = read_jsonl(tmp_path / "on" / "pairs.jsonl")
    assert [{k: v for k, v in p.items() if k != "kind"} for p in mixed[:3]] == plain  # actor pairs unchanged
    assert [p["kind"] for p in mixed] == ["actor"] * 3 + ["judge"] * 2  # 2 / 5 = 0.4
    assert {k: v for k, v in on.items() if k != "meta"} == off and on["meta"]["judge_pairs_used"] == 2


def test_report_lines(tmp_path):
    assert report_lines(tmp_path) == []
    summary = {"responses": 8, "responses_compared": 3, "comparisons": 9, "parse_rate": 0.5,
               "both_orders_parsed_rate": 0.25, "first_position_rate": 0.75, "winners": 2, "ties": 7,
               "tie_reasons": {"no_verdict": 5, "orders_disagree": 2}, "judge_pairs": 1,
               "dropped": {"no_winner": 2}}
    (tmp_path / "iter_1" / STAGE).mkdir(parents=True)
    (tmp_path / "iter_1" / STAGE / "done.json").write_text(json.dumps(summary))
    (tmp_path / "iter_1" / "4_pairs").mkdir()
    (tmp_path / "iter_1" / "4_pairs" / "done.json").write_text(json.dumps({"meta": {
        "judge_pairs_used": 1, "total_pairs": 7, "judge_share_used": 1 / 7, "judge_share_target": 0.15,
        "judge_pairs_over_share": 0}}))
    lines = report_lines(tmp_path)
    row = next(line for line in lines if line.startswith("| 1 |"))
    assert "3 / 8" in row and "0.500 / 0.250" in row and "no_verdict 5" in row and "no_winner 2" in row
    assert "1 of 7 (0.143, target 0.15)" in row
    assert lines[0].startswith("## ")


# --- one tiny loop with the meta-judge, 2 ranks ---------------------------------------------------------
META_SFT = 12  # meta-judge examples in M1's SFT (the world's short meta prompt fits the tiny context)
OVERRIDES = test_loop_run.OVERRIDES + [
    "sft.zero_stage=3", "dpo.zero_stage=3", "eval.enabled=false", "eval.sft_baseline=false",
    "data.eft_own_samples=0", "dpo.epochs=2", "meta.enabled=true", "meta.max_new_tokens=8",
    "meta.max_comparisons=1", "meta.judge_share=0.5", "meta.max_judge_share=0.5", "meta.template=world",
    f"meta.sft_examples={META_SFT}"]
INJECTED_TARGETS = 2  # responses whose comparisons are all written by hand: "a" (lower sample index) wins


def _launch(cmd, log):
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=test_loop_dist._env(),
                              timeout=600)
    assert proc.returncode == 0, Path(log).read_text()[-4000:]


def _args(run_dir, cache, *extra):
    return ["loop/iterate.py", "--run-dir", str(run_dir), *extra, *OVERRIDES, f"data.world_cache_dir={cache}"]


def _plan(run):
    it = run / "iter_1"
    responses = read_jsonl(it / "2_responses" / "responses.jsonl", ("id", "prompt_id", "text"))
    judgments = read_jsonl(it / "3_judgments" / "judgments.jsonl")
    return plan_comparisons(responses, judgments, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("meta_loop")
    cache, two = base / "world_cache", base / "two_ranks"
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             *_args(two, cache)], base / "two_ranks.log")

    # The copy: everything up to the judgments, plus hand-written meta-judgments for the first responses.
    hand = base / "hand"
    shutil.copytree(two, hand, symlinks=True)
    for rel in ("iter_1/" + STAGE, "iter_1/4_pairs", "iter_1/5_ref_logprobs", "iter_1/6_dpo", "iter_1/7_select",
                "models/M2", "models/M2.ckpt"):
        shutil.rmtree(hand / rel, ignore_errors=True)
    plan, _ = _plan(hand)
    targets = list(dict.fromkeys(c["target_id"] for c in plan))[:INJECTED_TARGETS]
    injected = []
    for c in plan:
        if c["target_id"] in targets:
            for order, text in (("ab", "A is right.\nWinner: Judgement A"), ("ba", "Winner: Judgement B")):
                injected.append({"id": comparison_id(c, order), "target_id": c["target_id"], "a_id": c["a"]["id"],
                                 "b_id": c["b"]["id"], "order": order, "text": text, "num_tokens": 5,
                                 "finish_reason": "stop", "verdict": parse_winner(text)})
    write_jsonl(hand / "iter_1" / f"{STAGE}.partial" / "comparisons.jsonl", injected)
    _launch([sys.executable, *_args(hand, cache, "--resume")], base / "hand.log")
    return {"two": two, "hand": hand, "targets": targets, "injected": injected, "cache": cache}


@pytest.mark.slow
@pytest.mark.multiproc
def test_every_stage_runs_with_the_meta_judge_on_two_ranks(runs):
    run = runs["two"]
    it = run / "iter_1"
    for stage in ("1_prompts", "2_responses", "3_judgments", STAGE, "4_pairs", "5_ref_logprobs", "6_dpo"):
        assert (it / stage / "done.json").exists(), stage
    assert json.loads((run / "manifest.json").read_text())["finished"] and not list(run.rglob("*.partial"))
    meta_sft = read_jsonl(run / "sft" / "M1" / "meta_sft.jsonl")  # M1 learned the meta prompt; the baseline not
    assert len(meta_sft) == META_SFT and all(parse_winner(r["response"]) in ("A", "B") for r in meta_sft)
    assert json.loads((run / "sft" / "M1" / "done.json").read_text())["meta_examples"] == META_SFT
    assert not (run / "sft" / "sft_baseline" / "meta_sft.jsonl").exists()
    assert all(r["prompt"].startswith("Two reviews of one response") for r in meta_sft)
    plan, counts = _plan(run)
    s = json.loads((it / STAGE / "done.json").read_text())
    assert s["comparisons"] == len(plan) > 0 and s["responses_compared"] == counts["disagreeing"]
    assert s["generations"] + s["too_long"] == 2 * len(plan) and s["winners"] + s["ties"] == len(plan)
    comps = read_jsonl(it / STAGE / "comparisons.jsonl")
    assert [r["id"] for r in comps] == [comparison_id(c, o) for c in plan for o in ("ab", "ba")]
    assert all(r["verdict"] == parse_winner(r["text"]) for r in comps)  # never coerced
    assert s["parsed"] == sum(r["verdict"] is not None for r in comps)
    judge_pairs = read_jsonl(it / STAGE / "judge_pairs.jsonl")
    assert s["judge_pairs"] == len(judge_pairs)
    assert s["judge_pairs"] + sum(s["dropped"].values()) == s["responses_compared"]
    pairs = read_jsonl(it / "4_pairs" / "pairs.jsonl")
    done4 = json.loads((it / "4_pairs" / "done.json").read_text())
    kinds = Counter(p["kind"] for p in pairs)
    assert (kinds["actor"], kinds["judge"]) == (done4["pairs"], done4["meta"]["judge_pairs_used"])
    assert json.loads((it / "6_dpo" / "done.json").read_text())["pairs"] == len(pairs)
    assert any(line.startswith("| 1 |") for line in report_lines(run))


@pytest.mark.slow
@pytest.mark.multiproc
def test_actor_pairs_are_the_default_pairs(runs, tmp_path):
    """With meta on, the actor pairs are exactly what the default (meta off) builds from the same files."""
    from loop.stage_aift import make_pairs

    it = runs["two"] / "iter_1"
    cfg = load_config(REPO / "configs" / "cpu_default.yaml", OVERRIDES + ["meta.enabled=false"])
    assert not cfg.meta.enabled
    make_pairs(cfg, prompts_path=it / "1_prompts" / "prompts.jsonl",
               responses_path=it / "2_responses" / "responses.jsonl",
               scores_path=it / "3_judgments" / "scores.jsonl", work=tmp_path)
    default = read_jsonl(tmp_path / "pairs.jsonl")
    actor = [{k: v for k, v in p.items() if k != "kind"} for p in read_jsonl(it / "4_pairs" / "pairs.jsonl")
             if p["kind"] == "actor"]
    assert actor == default and all("kind" not in p for p in default)


@pytest.mark.slow
@pytest.mark.multiproc
def test_hand_written_verdicts_become_judge_pairs_that_dpo_trains_on(runs):
    two, hand = runs["two"] / "iter_1", runs["hand"] / "iter_1"
    comps = read_jsonl(hand / STAGE / "comparisons.jsonl")
    injected = {r["id"]: r for r in runs["injected"]}
    reference = {r["id"]: r for r in read_jsonl(two / STAGE / "comparisons.jsonl")}
    assert len(comps) == len(reference)
    for r in comps:  # the rest, judged on 1 rank after the resume, is the 2-rank run's record for record
        assert r == (injected[r["id"]] if r["id"] in injected else reference[r["id"]])
    judgments = {j["id"]: j for j in read_jsonl(two / "3_judgments" / "judgments.jsonl")}
    pairs = {p["target_id"]: p for p in read_jsonl(hand / STAGE / "judge_pairs.jsonl")}
    responses = {r["id"]: r for r in read_jsonl(two / "2_responses" / "responses.jsonl")}
    prompts = {p["id"]: p["prompt"] for p in read_jsonl(two / "1_prompts" / "prompts.jsonl")}
    from loop.world import World, WorldConfig

    template = load_template(World(WorldConfig()).judge_template_path)
    for target in runs["targets"]:
        # the lower sample index always wins (a full tournament with more comparisons): first beats all
        compared = sorted({r[k] for r in runs["injected"] if r["target_id"] == target for k in ("a_id", "b_id")},
                          key=lambda i: judgments[i]["sample_index"])
        p = pairs[target]
        assert (p["chosen_id"], p["rejected_id"]) == (compared[0], compared[-1])
        assert p["chosen"] == judgments[compared[0]]["text"] and p["rejected"] == judgments[compared[-1]]["text"]
        # the DPO prompt is the judge prompt this response was judged with (both go through chat_ids)
        r = responses[target]
        assert p["prompt"] == fill_template(template, prompts[r["prompt_id"]], r["text"])
        assert not p["chosen_finished"]  # judge.mode=expected: the score follows the justification
    ref_pairs = {p["id"]: p for p in read_jsonl(hand / "5_ref_logprobs" / "pairs.jsonl")}
    mixed = read_jsonl(hand / "4_pairs" / "pairs.jsonl")
    judge_ids = [p["id"] for p in mixed if p["kind"] == "judge"]
    assert judge_ids and set(judge_ids) <= {p["id"] for p in pairs.values()}
    assert all(isinstance(ref_pairs[i]["ref_chosen"], float) for i in judge_ids)
    actor_two = read_jsonl(two / "4_pairs" / "pairs.jsonl")
    assert [p for p in mixed if p["kind"] == "actor"] == [p for p in actor_two if p["kind"] == "actor"]
    dpo = json.loads((hand / "6_dpo" / "done.json").read_text())
    assert dpo["pairs"] == len(mixed) and dpo["steps"] > 0 and "skipped" not in dpo
    s = json.loads((hand / STAGE / "done.json").read_text())
    assert s["winners"] >= len(runs["injected"]) // 2 and s["judge_pairs"] >= INJECTED_TARGETS
