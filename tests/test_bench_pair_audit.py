"""bench/pair_audit.py on hand-written iteration records: each pair is right, noise or wrong by the grader."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import pair_audit  # noqa: E402
from loop.records import write_jsonl  # noqa: E402
from loop.stages import F, PAIRS, PROMPTS, RESPONSES  # noqa: E402


def test_pairs_graded_right_noise_wrong(tmp_path):
    a = "From 12 red , 31 blue , 7 red , 25 green , name a red number."  # 12 and 7 are right; 31 and 25 are not
    b = "Name a number from 12 31 7 25 that is not in 7 40 12 33."  # 31 and 25 are right
    prompts = [{"id": "a", "prompt": a}, {"id": "b", "prompt": b}, {"id": "c", "prompt": a}]
    responses = [("a", "12"), ("a", "31"), ("b", "31"), ("b", "25"), ("c", "31"), ("c", "31")]
    pairs = [{"prompt": a, "chosen": "12", "rejected": "31"},   # right
             {"prompt": b, "chosen": "31", "rejected": "25"},   # noise: both right
             {"prompt": a, "chosen": "31", "rejected": "31"},   # noise, one text twice
             {"prompt": a, "chosen": "25", "rejected": "7"}]    # wrong
    for stage, file, rows in ((PROMPTS, F.PROMPTS, prompts), (PAIRS, F.PAIRS, pairs),
                              (RESPONSES, F.RESPONSES, [{"prompt_id": p, "text": t} for p, t in responses])):
        path = stage.path(tmp_path, file, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, rows)
    c = pair_audit.audit(tmp_path, 1)
    assert (c["pairs"], c["right"], c["noise"], c["wrong"], c["identical"]) == (4, 1, 2, 1, 1)
    assert (c["chosen correct"], c["rejected correct"]) == (2, 2)
    assert (c["prompts"], c["prompts with different grades"]) == (3, 1)
    assert pair_audit.audit(tmp_path, 2) is None
