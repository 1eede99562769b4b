"""Inputs longer than the context: skipped with their reason (never raised), counted in the stage summary
and the report, the same on 1 and 2 ranks and on resume; training examples cut prompt-side first."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_loop_run

from engine.data import SFTExample, PreferencePair, fit_prompt_side
from engine.distributed import init_distributed
from engine.sampler import Sampler, SamplingParams
from engine.objectives import response_targets
from loop import stage_aift as A
from loop.config import load_config
from loop.generation import read_skipped, split_overlong
from loop.pairs import DROP_OVERLONG
from loop.records import read_jsonl, write_jsonl
from loop.report import render, collect
from loop.stage_dir import StageDir
from model.config import preset
from model.llama import Llama
from model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_scripts" / "overlong_generate.py"
SPM = ROOT / "tests" / "fixtures" / "llama2-spm" / "tokenizer.model"


def test_split_overlong_boundary():
    reqs = [{"id": "a", "ids": [1] * 10}, {"id": "b", "ids": [1] * 11}]
    fit, skipped = split_overlong(reqs, SamplingParams(max_new_tokens=6, n=2), context=16)
    assert [r["id"] for r in fit] == ["a"]  # 10 + 6 = 16 fits exactly
    assert skipped == [{"id": f"b-s{s}", "request_id": "b", "skipped": "prompt of 11 tokens + max_new_tokens 6 "
                        "> context 16"} for s in range(2)]


def _run_script(workdir: Path, tag: str, nproc: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(SCRIPT), str(workdir), tag] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT),
         str(workdir), tag]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / f"{tag}.json").read_text())


@pytest.mark.multiproc
def test_overlong_requests_skipped_the_same_on_one_and_two_ranks(tmp_path):
    one = _run_script(tmp_path, "one", 1)
    two = _run_script(tmp_path, "two", 2)
    # 43, 60 and 47 tokens + 6 new do not fit a 48-token context; 60 alone would make the sampler raise
    skipped_requests = sorted({s["request_id"] for s in one["skipped"]})
    assert skipped_requests == ["r1", "r4", "r6"]
    assert all("> context 48" in s["skipped"] for s in one["skipped"]) and len(one["skipped"]) == 6
    assert one["summary"]["overlong_skipped"] == {"out.skipped.jsonl": 6}
    assert len(one["first"]) == 12 and not {r["request_id"] for r in one["first"]} & set(skipped_requests)
    assert one["first"] == one["again"] == one["on_disk"]  # the resumed call regenerates nothing
    for key in ("first", "skipped", "on_disk", "summary"):
        assert two[key] == one[key], key


def test_direct_sampler_call_still_refuses_a_prompt_over_the_context():
    cfg = preset("tiny", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=16,
                 eos_token_id=None, tie_embeddings=False)
    s = Sampler(Llama(cfg).init_weights(std=0.1).eval(), kv_memory=1 << 18, block_size=4, cuda_graphs=False)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        s.generate([[1] * 16], SamplingParams(max_new_tokens=2))


@pytest.fixture(scope="module")
def aift(tmp_path_factory):
    """Stages (2)-(4) on a tiny random model with the llama2 tokenizer: one prompt whose responses do not fit,
    one whose responses fit but whose judge inputs do not, the rest short."""
    work = tmp_path_factory.mktemp("overlong_aift")
    tok = load_tokenizer(SPM)
    cfg_m = preset("tiny", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=tok.vocab_size,
                   max_seq_len=160, eos_token_id=None, tie_embeddings=False)
    model = Llama(cfg_m).init_weights(std=0.1, generator=torch.Generator().manual_seed(0)).eval()
    sampler = Sampler(model, tokenizer=tok, kv_memory=1 << 22, block_size=16, cuda_graphs=False)
    cfg = load_config(None, ["responses.n=2", "responses.max_new_tokens=8", "judge.k=1", "judge.max_new_tokens=8",
                             "judge.mode=sampled", "run.chunk_size=2"])
    template = "Judge. <INSTRUCTION_HERE> / <RESPONSE_HERE> Score:"
    medium = " ".join(["word"] * 140)  # fits with 8 new tokens; with the judge template and a response it cannot
    prompts = [{"id": "short1", "prompt": "Say hi."}, {"id": "long", "prompt": " ".join(["word"] * 400)},
               {"id": "medium", "prompt": medium}, {"id": "short2", "prompt": "Name a colour."}]
    n_medium = len(A.P.chat_ids(tok, medium))
    assert n_medium + 8 <= 160 < n_medium + len(tok.encode(template)) + 8
    write_jsonl(work / "prompts.jsonl", prompts)
    dist = init_distributed()
    out = {}
    for name, fn, kw in (("2_responses", A.gen_responses, {}),
                         ("3_judgments", A.judge_responses, {"template": template}),
                         ("4_pairs", None, {})):
        st = StageDir(work / "iter_1" / name, dist)
        w = st.begin()
        if fn is A.gen_responses:
            summary = fn(sampler, tok, dist, cfg, prompts_path=work / "prompts.jsonl", work=w, iteration=1)
        elif fn is A.judge_responses:
            summary = fn(sampler, tok, dist, cfg, prompts_path=work / "prompts.jsonl",
                         responses_path=work / "iter_1" / "2_responses" / "responses.jsonl", work=w, iteration=1,
                         **kw)
        else:
            summary = A.make_pairs(cfg, prompts_path=work / "prompts.jsonl",
                                   responses_path=work / "iter_1" / "2_responses" / "responses.jsonl",
                                   scores_path=work / "iter_1" / "3_judgments" / "scores.jsonl", work=w)
        out[name] = st.finish(summary)
    return work, out


def test_skipped_response_is_not_judged_and_skipped_judgment_is_no_score(aift):
    work, summaries = aift
    it = work / "iter_1"
    responses = read_jsonl(it / "2_responses" / "responses.jsonl", ("id", "prompt_id"))
    assert {r["prompt_id"] for r in responses} == {"short1", "medium", "short2"}
    assert {s["request_id"] for s in read_skipped(it / "2_responses" / "responses.jsonl")} == {"long"}
    assert summaries["2_responses"]["overlong_skipped"] == {"responses.skipped.jsonl": 2}
    judged = {j["target_id"] for j in read_jsonl(it / "3_judgments" / "judgments.jsonl", ("id", "target_id"))}
    assert judged == {r["id"] for r in responses if r["prompt_id"] != "medium"}
    assert summaries["3_judgments"]["overlong_skipped"] == {"judgments.skipped.jsonl": 2}
    scores = {s["id"]: s for s in read_jsonl(it / "3_judgments" / "scores.jsonl", ("id", "scores", "mean"))}
    assert all(scores[r["id"]]["mean"] is None and scores[r["id"]]["scores"] == []
               for r in responses if r["prompt_id"] == "medium")
    assert summaries["3_judgments"]["responses_without_score"] >= 2


def test_pairs_name_overlong_as_the_drop_reason(aift):
    work, summaries = aift
    outcomes = {o["id"]: o for o in read_jsonl(work / "iter_1" / "4_pairs" / "outcomes.jsonl", ("id", "dropped"))}
    assert outcomes["long"]["dropped"] == DROP_OVERLONG and outcomes["medium"]["dropped"] == DROP_OVERLONG
    assert outcomes["short1"]["dropped"] != DROP_OVERLONG and outcomes["short2"]["dropped"] != DROP_OVERLONG
    assert summaries["4_pairs"]["dropped"][DROP_OVERLONG] == 2


def test_report_has_a_line_per_stage_with_skips(aift):
    work, _ = aift
    text = render(work, collect(work), [], None)
    assert "- iter_1/2_responses: 2 skipped (responses.skipped.jsonl)" in text
    assert "- iter_1/3_judgments: 2 skipped (judgments.skipped.jsonl)" in text


def test_training_examples_lose_the_prompt_side_first():
    score = [901, 902, 903]  # the EFT target's closing "Score: n"
    ex = SFTExample(prompt_ids=[1] + list(range(10, 30)), response_ids=list(range(50, 60)) + score)
    cut, was_cut = fit_prompt_side(ex, 16)
    assert was_cut and cut.response_ids == ex.response_ids and len(cut.prompt_ids) + len(cut.response_ids) == 16
    assert cut.prompt_ids == [1, 28, 29]  # BOS, then the end of the prompt
    # every response token stays a target under the trainer's cut at max_len
    assert response_targets(cut, 16) == len(ex.response_ids)
    assert fit_prompt_side(ex, 40) == (ex, False)
    pair = PreferencePair("p", [1] + [5] * 20, [6] * 8, [7] * 3)
    cut, was_cut = fit_prompt_side(pair, 12)
    assert was_cut and cut.prompt_ids == [1, 5, 5, 5] and cut.chosen_ids == pair.chosen_ids
    # a response longer than max_len alone keeps one prompt token (the collator then cuts it on the right)
    cut, _ = fit_prompt_side(SFTExample([1, 2, 3], [9] * 20), 8)
    assert cut.prompt_ids == [1]


def test_sft_stage_counts_truncated_examples(tmp_path):
    from loop.stage_train import fit_context
    from model.checkpoint import save_pretrained

    cfg_m = preset("tiny", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=24)
    save_pretrained(Llama(cfg_m).init_weights(std=0.02), tmp_path / "m0")
    examples = [SFTExample([1] * n, [2] * 5) for n in (3, 19, 20, 40)]
    fitted, cut = fit_context(examples, tmp_path / "m0", max_seq_len=0)
    assert cut == 2 and [len(x.prompt_ids) for x in fitted] == [3, 19, 19, 19]
    fitted, cut = fit_context(examples, tmp_path / "m0", max_seq_len=16)  # the section's cap below the context
    assert cut == 3 and all(len(x.prompt_ids) + 5 <= 16 for x in fitted)


# The whole loop with a 250-token context: most judge inputs (the world's template + task + response) and
# some EFT training examples do not fit. Killed in the middle of the judging stage, then resumed.
# No SFT baseline and no evaluation: only what the over-long inputs pass through, to keep the three runs short.
LOOP = [o.replace("max_seq_len: 384", "max_seq_len: 250") for o in test_loop_run.OVERRIDES] + [
    "data.eft_own_samples=0", "eval.enabled=false", "eval.sft_baseline=false", "dpo.epochs=1"]


def _loop(run_dir, cache, *extra, kill_when=None):
    saved = test_loop_run.OVERRIDES
    test_loop_run.OVERRIDES = LOOP
    try:
        return test_loop_run._run(run_dir, cache, *extra, kill_when=kill_when)
    finally:
        test_loop_run.OVERRIDES = saved


@pytest.mark.slow
def test_loop_with_overlong_inputs_finishes_and_resumes(tmp_path):
    assert any("max_seq_len: 250" in o for o in LOOP)
    cache, ref, run = tmp_path / "cache", tmp_path / "ref", tmp_path / "killed"
    _loop(ref, cache)
    partial = run / "iter_1" / "3_judgments.partial" / "judgments.jsonl"
    assert _loop(run, cache, kill_when=lambda: partial.exists() and partial.stat().st_size > 0)
    _loop(run, cache, "--resume")
    it = ref / "iter_1"
    done = json.loads((it / "3_judgments" / "done.json").read_text())
    n_skipped = done["overlong_skipped"]["judgments.skipped.jsonl"]
    judged = len(read_jsonl(it / "3_judgments" / "judgments.jsonl"))
    n_responses = len(read_jsonl(it / "2_responses" / "responses.jsonl"))
    assert n_skipped > 0 and judged > 0 and n_skipped + judged == 3 * n_responses  # judge.k = 3
    assert json.loads((it / "4_pairs" / "done.json").read_text())["dropped"][DROP_OVERLONG] > 0
    assert json.loads((ref / "sft" / "M1" / "done.json").read_text())["truncated_examples"] > 0
    report = (ref / "report.md").read_text()
    assert f"- iter_1/3_judgments: {n_skipped} skipped (judgments.skipped.jsonl)" in report
    for rel in ("iter_1/3_judgments/judgments.jsonl", "iter_1/3_judgments/judgments.skipped.jsonl",
                "iter_1/4_pairs/pairs.jsonl", "iter_1/4_pairs/outcomes.jsonl"):
        assert read_jsonl(run / rel) == read_jsonl(ref / rel), rel
    assert json.loads((run / "manifest.json").read_text())["finished"]
