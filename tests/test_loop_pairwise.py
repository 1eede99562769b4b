"""The grader-free head to head: strict verdict parsing, both presentation orders (position bias cancels,
a consistent preference wins), the judging stage through the real generation path with a scripted judge,
and the user's prompt set for evaluation."""
import json
import pathlib
import re

import pytest

from engine.distributed import init_distributed
from engine.sampler.sampler import Completion
from loop.pairwise import (fill_pairwise, judge_match, load_pairwise_template, match_summary, parse_verdict,
                           verdict_sign)
from loop.records import RecordError, read_jsonl, write_jsonl
from loop.stage_eval import head_to_head_from_grades, load_eval_prompts
from model.tokenizer import load_tokenizer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llama2-spm"


def test_parse_verdict_is_strict():
    assert parse_verdict("A is more helpful. Final verdict: [[A]]") == "A"
    assert parse_verdict("[[B]]") == "B" and parse_verdict("they are equal [[C]]") == "C"
    assert parse_verdict("[[A]] ... so again [[A]]") == "A"  # repeated, one verdict
    for bad in ("[[A]] or [[B]]", "A", "[A]", "[[ A ]]", "[[a]]", "[[D]]", "", None, "Verdict: A"):
        assert parse_verdict(bad) is None, bad


def test_template_slots_and_single_pass_fill(tmp_path):
    t = load_pairwise_template("pairwise_judge.txt")
    assert t.endswith("[The End of Assistant B's Answer]") and '"[[C]]" for a tie' in t
    # An answer that contains a slot name is not substituted into.
    text = fill_pairwise(t, "Q?", "first <RESPONSE_B_HERE>", "second")
    assert "first <RESPONSE_B_HERE>\n[The End of Assistant A's Answer]" in text and "second\n[The End" in text
    bad = tmp_path / "t.txt"
    bad.write_text("<INSTRUCTION_HERE> <RESPONSE_A_HERE>")
    with pytest.raises(ValueError, match="t.txt:1: .*<RESPONSE_B_HERE>"):
        load_pairwise_template(bad)


def _records(verdicts_ab, verdicts_ba):
    out = []
    for i, (x, y) in enumerate(zip(verdicts_ab, verdicts_ba)):
        out += [{"prompt_id": str(i), "order": "ab", "verdict": x}, {"prompt_id": str(i), "order": "ba", "verdict": y}]
    return out


def test_both_orders():
    assert verdict_sign("A", "ab") == 1 and verdict_sign("A", "ba") == -1
    assert verdict_sign("B", "ab") == -1 and verdict_sign("B", "ba") == 1
    assert verdict_sign("C", "ab") == verdict_sign(None, "ba") == 0
    ids = [str(i) for i in range(4)]
    # Always the first answer: every prompt's two orders disagree -> all ties, position rate 1.
    s = match_summary(_records(["A"] * 4, ["A"] * 4), ids)
    assert (s["win"], s["tie"], s["loss"], s["inconsistent"], s["first_position_rate"]) == (0.0, 100.0, 0.0, 4, 1.0)
    # Model A preferred in both orders on 3 prompts, model B on 1.
    s = match_summary(_records(["A", "A", "A", "B"], ["B", "B", "B", "A"]), ids)
    assert (s["win"], s["tie"], s["loss"], s["inconsistent"]) == (75.0, 0.0, 25.0, 0)
    # A judged tie or an unparsable verdict in one order makes a tie; unparsable ones are counted.
    s = match_summary(_records(["A", "A", None, "C"], ["B", "C", "B", None]), ids)
    assert (s["win"], s["tie"], s["unparsable"], s["judgments"]) == (25.0, 75.0, 2, 8)


class ScriptedJudge:
    """A sampler whose 'model' reads the two answers out of the rendered judge prompt and applies a rule."""

    def __init__(self, tok, rule, max_seq_len=4096):
        self.tok, self.rule = tok, rule
        self.model = type("M", (), {"config": type("C", (), {"max_seq_len": max_seq_len})()})()
        self.calls = 0

    def generate(self, prompts, params, progress=False):
        out = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            a = re.search(r"Assistant A's Answer\]\s*(.*?)\s*\[The End of Assistant A", text, re.S).group(1)
            b = re.search(r"Assistant B's Answer\]\s*(.*?)\s*\[The End of Assistant B", text, re.S).group(1)
            verdict = self.rule(a, b)
            out.append(Completion(i, 0, self.tok.encode(verdict, bos=False), verdict, "stop"))
            self.calls += 1
        return out


def _match(tmp_path, rule, answers_a, answers_b, max_seq_len=4096):
    tok = load_tokenizer(FIXTURE)
    judge = ScriptedJudge(tok, rule, max_seq_len)
    prompts = [{"id": k, "prompt": f"question {k}"} for k in answers_a]
    records = judge_match(judge, tok, init_distributed(), template=load_pairwise_template("pairwise_judge.txt"),
                          prompts=prompts, answers_a=answers_a, answers_b=answers_b, out_path=tmp_path / "pw.jsonl",
                          run_seed=0, stage="test", temperature=0.0, top_p=1.0, max_new_tokens=8, chunk_size=2)
    return judge, records, match_summary(records, list(answers_a))


def test_judge_match_position_bias_and_length_preference(tmp_path):
    a = {"p1": "a long and detailed answer", "p2": "long answer here too", "p3": "x"}
    b = {"p1": "short", "p2": "brief", "p3": "a much longer answer than x"}
    _, records, s = _match(tmp_path / "first", lambda x, y: "Verdict: [[A]]", a, b)
    assert [r["id"] for r in records] == ["p1-ab", "p1-ba", "p2-ab", "p2-ba", "p3-ab", "p3-ba"]
    assert s["tie"] == 100.0 and s["unparsable"] == 0
    judge, records, s = _match(tmp_path / "longer", lambda x, y: "[[A]]" if len(x) > len(y) else "[[B]]", a, b)
    assert judge.calls == 6 and s["win"] == pytest.approx(200 / 3) and s["loss"] == pytest.approx(100 / 3)
    assert s["inconsistent"] == 0 and s["first_position_rate"] == 0.5
    assert read_jsonl(tmp_path / "longer" / "pw.jsonl") == records  # every judgment is on disk
    # Resumed: nothing is judged again.
    again, records2, _ = _match(tmp_path / "longer", lambda x, y: "[[A]]" if len(x) > len(y) else "[[B]]", a, b)
    assert again.calls == 0 and records2 == records


def test_prompt_too_long_for_the_judge_is_a_counted_tie(tmp_path):
    a, b = {"p1": "word " * 400, "p2": "ok"}, {"p1": "short", "p2": "fine"}
    _, records, s = _match(tmp_path, lambda x, y: "[[A]]" if len(x) > len(y) else "[[B]]", a, b, max_seq_len=600)
    skipped = [r for r in records if r.get("skipped")]
    assert {r["id"] for r in skipped} == {"p1-ab", "p1-ba"} and s["too_long"] == 2 and s["unparsable"] == 0
    assert s["tie"] == 50.0 and s["loss"] == 50.0  # p2: B ("fine") is longer in both orders


def test_grader_head_to_head_is_one_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "score": 5.0}, {"id": "2", "score": 1.0}, {"id": "3", "score": 2.0}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "1", "score": 3.0}, {"id": "2", "score": 4.0}, {"id": "3", "score": 2.0}])
    r = head_to_head_from_grades(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert r["orders"] == 1 and r["num_prompts"] == 3
    assert (r["win"], r["tie"], r["loss"]) == pytest.approx((100 / 3, 100 / 3, 100 / 3))


def test_user_prompt_set(tmp_path):
    f = tmp_path / "alpaca.jsonl"
    f.write_text(json.dumps({"instruction": "Name a color.", "dataset": "helpful_base"}) + "\n\n"
                 + json.dumps({"id": "q2", "prompt": "Say hi."}) + "\n")
    assert load_eval_prompts(f) == [{"id": "line1", "prompt": "Name a color.", "dataset": "helpful_base"},
                                    {"id": "q2", "prompt": "Say hi."}]
    f.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "b", "output": "y"}) + "\n")
    with pytest.raises(RecordError, match=r"alpaca.jsonl:2: needs a non-empty string field prompt"):
        load_eval_prompts(f)
    f.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "a", "prompt": "y"}) + "\n")
    with pytest.raises(RecordError, match=r"alpaca.jsonl:2: duplicate id 'a'"):
        load_eval_prompts(f)


def test_config_keys_name_themselves(tmp_path):
    from loop.config import LoopConfigError, load_config

    for override, key in ((f"eval.pairwise_judge={tmp_path / 'nope'}", "eval.pairwise_judge"),
                          (f"eval.prompts_path={tmp_path / 'nope.jsonl'}", "eval.prompts_path"),
                          ("eval.pairwise_template=missing.txt", "eval.pairwise_template")):
        with pytest.raises(LoopConfigError, match=f"^loop config: {key} "):
            load_config(None, [override])
    cfg = load_config(None, [])
    assert cfg.eval.pairwise and cfg.eval.pairwise_judge is None and cfg.eval.prompts_path is None
