"""End to end on a tiny world model: every artifact, kill -9 + --resume equals an uninterrupted run,
and the AIFT stages never touch the ground-truth grader.

The three runs share one cached M0 (a few pretraining steps: the model is close to random, so the
judge uses the "expected" score, which always yields a number, and the world's prompt filter is off).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from loop.records import read_jsonl

pytestmark = pytest.mark.slow  # ~2-3 min: three short runs sharing one M0

REPO = pathlib.Path(__file__).resolve().parent.parent
WORLD = ("data.world={n_ift: 32, n_eft_train: 8, n_eft_eval: 3, n_eval_prompts: 6, corpus_docs: 200, "
         "pretrain_steps: 4, pretrain_batch: 4, pretrain_seq_len: 128, tokenizer_vocab_size: 512, "
         "model_overrides: {dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64, max_seq_len: 384}}")
OVERRIDES = [
    WORLD, "run.iterations=1", "run.chunk_size=4", "data.eft_own_samples=2",
    "prompts.num_prompts=12", "prompts.attempts_factor=1.5", "prompts.world_filter=false", "prompts.min_words=1",
    "prompts.max_words=200", "prompts.rouge_threshold=1.0", "prompts.max_new_tokens=16",
    "responses.max_new_tokens=12", "judge.mode=expected", "judge.max_new_tokens=12", "eval.max_new_tokens=8",
    "sft.epochs=1", "sft.global_batch=8", "sft.micro_batch=8", "sft.warmup_steps=0",
    "dpo.epochs=6", "dpo.global_batch=2", "dpo.micro_batch=2", "dpo.checkpoint_every=1",
]


def _cmd(run_dir, cache, *extra):
    return [sys.executable, "loop/iterate.py", "--run-dir", str(run_dir), *extra, *OVERRIDES,
            f"data.world_cache_dir={cache}"]


def _run(run_dir, cache, *extra, kill_when=None, timeout=600):
    log = open(run_dir.with_suffix(".log"), "a")
    proc = subprocess.Popen(_cmd(run_dir, cache, *extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.time() + timeout
    killed = False
    while proc.poll() is None and time.time() < deadline:
        if kill_when is not None and kill_when():
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    rc = proc.wait(timeout=max(1, deadline - time.time()))
    log.close()
    if not killed:
        assert rc == 0, run_dir.with_suffix(".log").read_text()[-3000:]
    return killed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("loop_runs")
    cache = base / "world_cache"
    ref = base / "ref"
    _run(ref, cache)

    # SIGKILL in the middle of stage (2): after the first chunk of responses is on disk.
    mid2 = base / "kill_responses"
    partial = mid2 / "iter_1" / "2_responses.partial" / "responses.jsonl"
    assert _run(mid2, cache, kill_when=lambda: partial.exists() and partial.stat().st_size > 0)
    assert not (mid2 / "iter_1" / "2_responses").exists()
    _run(mid2, cache, "--resume")

    # SIGKILL in the middle of stage (6): once DPO has written its first resumable checkpoint.
    mid6 = base / "kill_dpo"
    ckpt = mid6 / "models" / "M2.ckpt"
    assert _run(mid6, cache, kill_when=lambda: ckpt.is_dir() and any(ckpt.glob("step*")))
    assert not (mid6 / "models" / "M2").exists() and not (mid6 / "iter_1" / "6_dpo").exists()
    _run(mid6, cache, "--resume")
    return {"ref": ref, "mid2": mid2, "mid6": mid6}


def test_full_run_produces_every_artifact(runs):
    run = runs["ref"]
    m = json.loads((run / "manifest.json").read_text())
    assert m["finished"] and m["config_hash"] and m["seed"] == 0
    for name in ("M0", "sft_baseline", "M1", "M2"):
        assert (run / "models" / name / "config.json").exists(), name
    for f in ("ift", "eft_train", "eft_eval", "eval_prompts"):
        assert read_jsonl(run / "seed" / f"{f}.jsonl")
    # EFT from the SFT baseline's own answers: the seed's synthetic groups first, then one graded group per
    # instruction whose judgments are exactly the grader's.
    from loop.world.grader import grade

    fields = ("id", "group_id", "prompt", "response", "rank", "judgment", "score")
    synthetic = read_jsonl(run / "seed" / "eft_train.jsonl", fields)
    eft = read_jsonl(run / "eft" / "eft_train.jsonl", fields)
    own = eft[len(synthetic):]
    assert eft[:len(synthetic)] == synthetic and own and len({r["id"] for r in eft}) == len(eft)
    assert {r["group_id"] for r in own} <= {g["group_id"] + "-own" for g in synthetic}
    for r in own:
        g = grade(r["prompt"], r["response"])
        assert (r["score"], r["judgment"]) == (g.score, g.justification)
    samples = read_jsonl(run / "eft" / "samples.jsonl", ("id", "group_id", "text"))
    assert len(samples) == 2 * len({r["group_id"] for r in synthetic})
    it = run / "iter_1"
    prompts = read_jsonl(it / "1_prompts" / "prompts.jsonl", ("id", "prompt"))
    responses = read_jsonl(it / "2_responses" / "responses.jsonl", ("id", "prompt_id", "sample_index", "text"))
    judgments = read_jsonl(it / "3_judgments" / "judgments.jsonl", ("id", "target_id", "score"))
    pairs = read_jsonl(it / "5_ref_logprobs" / "pairs.jsonl", ("id", "chosen", "rejected", "ref_chosen", "ref_rejected"))
    outcomes = read_jsonl(it / "4_pairs" / "outcomes.jsonl", ("id", "dropped"))
    assert len(prompts) == 12 and len(responses) == 4 * len(prompts) and len(judgments) == 3 * len(responses)
    assert len(outcomes) == len(prompts) and len(pairs) >= 2
    assert all(isinstance(p["ref_chosen"], float) for p in pairs)
    dpo = json.loads((it / "6_dpo" / "done.json").read_text())
    assert dpo["steps"] > 0 and "skipped" not in dpo
    for model in ("sft_baseline", "M1", "M2"):
        e = run / "eval" / model
        assert json.loads((e / "done.json").read_text())["reward_model"]["num_groups"] == 3
        assert len(json.loads((e / "alpaca_eval.json").read_text())) == 6
        assert len(read_jsonl(e / "grades.jsonl", ("id", "score"))) == 6
        # self-pair accuracy: 6 prompts x responses.n (4) sampled, each judged judge.k (3) times, and the
        # summary recomputes from the records written beside it
        own = read_jsonl(e / "self_responses.jsonl", ("id", "prompt_id", "text", "grade"))
        own_judgments = read_jsonl(e / "self_judgments.jsonl", ("id", "target_id", "score"))
        assert len(own) == 24 and len(own_judgments) == 72
        assert all(r["grade"] == grade(next(p["prompt"] for p in read_jsonl(run / "seed" / "eval_prompts.jsonl")
                                            if p["id"] == r["prompt_id"]), r["text"]).score for r in own)
        from loop.judge import mean_scores
        from loop.self_pairs import self_pair_accuracy
        sp = json.loads((e / "done.json").read_text())["self_pairs"]
        want = self_pair_accuracy(own, {r["id"]: r["grade"] for r in own}, mean_scores(own_judgments))
        assert {k: sp[k] for k in want} == want and sp["prompts"] == 6
    report = (run / "report.md").read_text()
    assert "## Iteration 1" in report and "pairs built" in report and "judge parse rate" in report
    assert "self-pair acc. %" in report
    assert "M2 vs M1" in report
    for png in ("score_distribution.png", "lengths.png", "metrics.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert not list(run.rglob("*.partial"))


def _records(run, rel):
    return read_jsonl(run / rel)


@pytest.mark.parametrize("which", ["mid2", "mid6"])
def test_resume_equals_uninterrupted(runs, which):
    ref, other = runs["ref"], runs[which]
    for rel in ("iter_1/1_prompts/prompts.jsonl", "iter_1/2_responses/responses.jsonl",
                "iter_1/3_judgments/judgments.jsonl", "iter_1/4_pairs/pairs.jsonl",
                "iter_1/5_ref_logprobs/pairs.jsonl"):
        a, b = _records(ref, rel), _records(other, rel)
        assert [r["id"] for r in a] == [r["id"] for r in b], rel  # same ids, same order, no duplicates
        assert a == b, rel  # and the same content: per-record seeds make generation replayable
    ref_dpo = json.loads((ref / "iter_1" / "6_dpo" / "done.json").read_text())
    dpo = json.loads((other / "iter_1" / "6_dpo" / "done.json").read_text())
    assert dpo["steps"] == ref_dpo["steps"]
    a, b = _records(ref, "eval/M2/generations.jsonl"), _records(other, "eval/M2/generations.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b]


def test_resume_refuses_changed_config(runs):
    proc = subprocess.run(_cmd(runs["ref"], runs["ref"].parent / "world_cache", "--resume") + ["dpo.objective.beta=0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--force-config" in proc.stderr and "dpo.objective.beta" in proc.stderr


def test_aift_stages_never_call_the_grader(runs, tmp_path):
    """Rerun iteration 1's AIFT stages (1)-(6) in-process with World.grade raising."""
    from engine.distributed import init_distributed
    from loop.config import load_config
    from loop.iterate import Loop
    from loop.world import grader_unavailable

    run = tmp_path / "copy"
    shutil.copytree(runs["ref"], run, symlinks=True)
    shutil.rmtree(run / "iter_1")
    shutil.rmtree(run / "models" / "M2")
    cfg = load_config(REPO / "configs" / "cpu_default.yaml",
                      OVERRIDES + [f"data.world_cache_dir={runs['ref'].parent / 'world_cache'}", f"run.run_dir={run}"])
    loop = Loop(cfg, init_distributed(), run)
    loop.prepare()
    loop.world.grade = lambda *a, **k: (_ for _ in ()).throw(AssertionError("grade() called in an AIFT stage"))
    with grader_unavailable():
        loop.iteration(1)
    loop.release_sampler()
    assert (run / "models" / "M2" / "config.json").exists()
    assert _records(run, "iter_1/4_pairs/pairs.jsonl") == _records(runs["ref"], "iter_1/4_pairs/pairs.jsonl")
