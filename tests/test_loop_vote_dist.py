"""judge.mode = vote through one AIFT iteration of the tiny world on 2 ranks (torchrun, gloo, ZeRO-3):
stage 3 samples nothing, rank 0 writes one vote record per response, and every pair is a more frequent
answer over a less frequent one."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loop.records import read_jsonl
from loop.vote import answer_key
from test_loop_dist import OVERRIDES, _env

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

REPO = Path(__file__).resolve().parent.parent


def test_vote_iteration_on_two_ranks(tmp_path):
    run = tmp_path / "vote"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "loop/iterate.py",
           "--run-dir", str(run), *OVERRIDES, f"data.world_cache_dir={tmp_path / 'cache'}", "judge.mode=vote",
           "eval.sft_baseline=false", "eval.pairwise=false", "eval.reward_metrics=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    it = run / "iter_1"
    responses = read_jsonl(it / "2_responses" / "responses.jsonl", ("id", "prompt_id", "text"))
    judgments = read_jsonl(it / "3_judgments" / "judgments.jsonl", ("id", "target_id", "score", "finish_reason"))
    assert [j["target_id"] for j in judgments] == [r["id"] for r in responses]  # one per response, no sampling
    assert {j["finish_reason"] for j in judgments} == {"vote"}
    counts = {}
    for r in responses:
        counts.setdefault(r["prompt_id"], Counter())[answer_key(r["text"])] += 1
    by_id = {r["id"]: r for r in responses}
    for j in judgments:
        r = by_id[j["target_id"]]
        assert j["score"] == pytest.approx(5.0 * counts[r["prompt_id"]][answer_key(r["text"])] / 4)
    pairs = read_jsonl(it / "4_pairs" / "pairs.jsonl", ("id", "chosen", "rejected"))
    for p in pairs:
        c = counts[p["id"]]
        assert c[answer_key(p["chosen"])] > c[answer_key(p["rejected"])]
    assert json.loads((run / "manifest.json").read_text())["finished"]
    sp = json.loads((run / "eval" / "M2" / "done.json").read_text())["self_pairs"]
    assert "vote" in sp and sp["prompts"] == 6
