"""bench/self_judge_diag.py on hand-written self-pair records: copying, the exact failing check and its verdict
are counted against the grader's checks of each judged answer."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import self_judge_diag  # noqa: E402
from loop.records import write_jsonl  # noqa: E402
from loop.stages import EVAL, F, SEED  # noqa: E402


def test_counts_against_the_graders_checks(tmp_path, capsys):
    task = "Name an even number between 12 and 30."
    responses = {"r0": "31", "r1": "14", "r2": "13"}  # fails the items rule / passes all / fails the goal
    judgments = [
        ("r0", "numbers: yes. count 1: yes. 12 < 31 < 30: no. Score: 2"),  # copied, exact check, says no
        ("r0", "numbers: yes. count 1: yes. 12 < 13 < 30: yes. 13 is even: no. Score: 3"),  # another number, yes
        ("r1", "numbers: yes. count 1: yes. 12 < 14 < 30: yes. 14 is even: yes. only answer: yes. Score: 5"),
        ("r2", "numbers: yes. count 1: yes. 12 < 13 < 30: yes. 13 is even: yes. only answer: yes. Score: 5"),
        ("r2", "numbers: yes. Score: 1"),  # stops before the failing check
    ]
    for path in (SEED.path(tmp_path, F.EVAL_PROMPTS), EVAL.path(tmp_path, F.SELF_RESPONSES, "M1")):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(SEED.path(tmp_path, F.EVAL_PROMPTS), [{"id": "p", "prompt": task}])
    write_jsonl(EVAL.path(tmp_path, F.SELF_RESPONSES, "M1"),
                [{"id": rid, "prompt_id": "p", "text": text} for rid, text in responses.items()])
    write_jsonl(EVAL.path(tmp_path, F.SELF_JUDGMENTS, "M1"),
                [{"id": f"j{i}", "target_id": rid, "text": text} for i, (rid, text) in enumerate(judgments)])
    write_jsonl(EVAL.path(tmp_path, F.GENERATIONS, "M1"), [{"id": "p", "text": "14"}])  # the greedy answer
    c = self_judge_diag.diagnose(tmp_path, "M1")
    assert (c["judgments"], c["items check written"], c["answer copied"]) == (5, 4, 3)
    assert (c["fails items"], c["fails items: judged"], c["fails items: exact check"], c["fails items: says no"]) \
        == (2, 2, 1, 1)
    assert (c["fails goal"], c["fails goal: judged"], c["fails goal: exact check"], c["fails goal: says no"]) \
        == (2, 1, 1, 0)
    ref = self_judge_diag.reference_ceiling(tmp_path, "M1")
    # grades 2 / 5 / 3: the greedy reference "14" is right, so it orders (r0, r1) and (r2, r1) and ties (r0, r2)
    g = ref["greedy"]
    assert (g["agree"], g["disagree"], g["tie"], g["reference_correct"]) == (2, 0, 1, 100.0)
    assert abs(g["accuracy"] - 250 / 3) < 1e-9
    # three different answers: the majority is the first seen, "31", which is wrong
    m = ref["majority"]
    assert (m["agree"], m["disagree"], m["tie"], m["reference_correct"]) == (0, 2, 1, 0.0)
    self_judge_diag.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "answer copied into the items check 3 / 4 (75%)" in out
    assert "greedy reference (correct on 100.0% of prompts): self-pair 83.3%" in out
