"""M0 in any checkpoint format goes through the loop: one tiny random Llama written as an HF directory, a
Meta directory and a .gguf file (tokenizer embedded), each run with tiny counts, and the report of every run
holds the grader-free pairwise head to head (win/tie/loss table and plot).

- HF dir, world data (its tasks as chat prompts, so the grader evaluates too): the whole loop, M0 -> M2.
- Meta dir, OASST data: M0 -> SFT baseline -> EFT builder -> M1 -> eval (no iteration).
- .gguf, OASST data (no grader): the whole loop; models/M0.gguf keeps its suffix and the HF exports carry
  the tokenizer the GGUF embeds.
"""
import json
import pathlib

import numpy as np
import pytest
import torch
import yaml

from loop.iterate import main
from loop.records import read_jsonl
from model.checkpoint import load_pretrained, save_pretrained
from model.config import LlamaConfig
from model.tokenizer import load_tokenizer
from test_checkpoint import half_to_interleaved
from test_model_parity import random_model

pytestmark = pytest.mark.slow  # three short runs, ~1 min each on 2 cores

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SPM = FIXTURES / "llama2-spm" / "tokenizer.model"
# Meta's params.json records no ffn size: 2/3 * 4 * 32 = 85, rounded up to multiple_of=32 -> 96; nor the
# context length (4096 for a Llama 2 vocabulary).
CONFIG = LlamaConfig(vocab_size=32000, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=96, max_seq_len=4096,
                     tie_embeddings=False, bos_token_id=1, eos_token_id=2)


def write_meta(model, directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir()
    sd, c = model.state_dict(), model.config
    meta = {"tok_embeddings.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.n_layers):
        for ours, theirs in names.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if ours.endswith("q_proj"):
                w = half_to_interleaved(w, c.n_heads)
            elif ours.endswith("k_proj"):
                w = half_to_interleaved(w, c.n_kv_heads)
            meta[f"layers.{i}.{theirs}.weight"] = w.clone()
    torch.save(meta, directory / "consolidated.00.pth")
    (directory / "params.json").write_text(json.dumps({"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                                                       "n_kv_heads": c.n_kv_heads, "vocab_size": -1,
                                                       "multiple_of": 32, "norm_eps": c.norm_eps}))
    (directory / "tokenizer.model").write_bytes(SPM.read_bytes())
    return directory


def write_gguf(model, path: pathlib.Path) -> pathlib.Path:
    """F32 tensors (q/k rows interleaved as llama.cpp's converter writes them) + the SentencePiece vocabulary."""
    gguf = pytest.importorskip("gguf")
    import sentencepiece

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, c.max_seq_len), (w.add_embedding_length, c.dim),
                       (w.add_block_count, c.n_layers), (w.add_feed_forward_length, c.ffn_dim),
                       (w.add_head_count, c.n_heads), (w.add_head_count_kv, c.n_kv_heads),
                       (w.add_layer_norm_rms_eps, c.norm_eps), (w.add_rope_freq_base, c.rope_theta),
                       (w.add_vocab_size, c.vocab_size)):
        add(value)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SPM))
    n = sp.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                       for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(True)
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            key = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        else:
            key = top[name]
        if key.endswith("attn_q.weight"):
            t = half_to_interleaved(t, c.n_heads)
        elif key.endswith("attn_k.weight"):
            t = half_to_interleaved(t, c.n_kv_heads)
        w.add_tensor(key, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("m0_formats")
    model = random_model(CONFIG, seed=3)
    paths = {"hf": save_pretrained(model, base / "hf", tokenizer_dir=SPM), "meta": write_meta(model, base / "meta"),
             "gguf": write_gguf(model, base / "tiny.gguf")}
    ids = torch.tensor([load_tokenizer(SPM).encode("Hello there, world")])
    with torch.no_grad():
        ref = model(ids)
        for fmt, p in paths.items():  # the three files hold the same model
            assert (load_pretrained(p)(ids) - ref).abs().max().item() < 1e-5, fmt
    return paths


TINY = {
    "run": {"seed": 0, "chunk_size": 4},
    "prompts": {"num_prompts": 2, "attempts_factor": 1.5, "world_filter": False, "min_words": 1, "max_words": 400,
                "rouge_threshold": 1.0, "max_new_tokens": 12},
    "responses": {"n": 2, "max_new_tokens": 6},
    # A random model rarely writes "Score: n": the expected score always yields a number, so pairs are built.
    "judge": {"mode": "expected", "k": 1, "max_new_tokens": 6},
    "sft": {"epochs": 1, "global_batch": 2, "micro_batch": 2, "warmup_steps": 0, "checkpoint_every": 0},
    "dpo": {"epochs": 1, "global_batch": 2, "micro_batch": 2, "warmup_steps": 0, "checkpoint_every": 0},
    "eval": {"max_new_tokens": 6, "pairwise": True},
}
SOURCES = {
    "world": {"data": {"source": "world", "world": {"n_ift": 8, "n_eft_train": 2, "n_eft_eval": 2, "n_eval_prompts": 3}},
              "judge": {"template": "world"}, "prompts": {"template": "self_instruct_world.txt"}},
    "oasst": {"data": {"source": "oasst", "oasst_path": str(FIXTURES / "oasst_tiny.jsonl"), "ift_size": 4,
                       "eft_prompts": 3, "eval_prompts": 3, "eft_eval_fraction": 0.34}},
}


def _config(tmp_path, init, source, iterations, prompts_path=None, judge=None):
    cfg = {section: dict(values) for section, values in TINY.items()}
    for section, values in SOURCES[source].items():
        cfg[section] = {**cfg.get(section, {}), **values}
    cfg["run"].update(iterations=iterations, run_dir=str(tmp_path / "run"))
    if prompts_path is not None:
        cfg["eval"]["prompts_path"] = str(prompts_path)
    if judge is not None:
        cfg["eval"]["pairwise_judge"] = str(judge)
    cfg["model"] = {"init": str(init), "chat_template": "llama2"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pairwise_rows(report: str) -> list[str]:
    section = report.split("## Head to head (pairwise judge, both orders, disagreement = tie)")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| M")]


# The user's prompt set (eval.prompts_path), AlpacaEval-style: no ids, an "instruction" and a "dataset".
USER_PROMPTS = [{"instruction": "Name three primary colors.", "dataset": "helpful_base"},
                {"instruction": "Write a haiku about rain.", "dataset": "koala"}]


@pytest.mark.parametrize("fmt,source,iterations", [("hf", "world", 1), ("meta", "oasst", 0), ("gguf", "oasst", 1)])
def test_m0_format_through_the_loop(checkpoints, tmp_path, fmt, source, iterations):
    user_prompts = judge = None
    if fmt == "meta":  # also: the user's prompt set, and a fixed judge checkpoint with its own tokenizer
        user_prompts = tmp_path / "user_prompts.jsonl"
        user_prompts.write_text("".join(json.dumps(p) + "\n" for p in USER_PROMPTS))
        judge = checkpoints["gguf"]
    assert main(["--config", str(_config(tmp_path, checkpoints[fmt], source, iterations, user_prompts, judge))]) == 0
    run = tmp_path / "run"
    m0 = json.loads((run / "m0" / "done.json").read_text())
    link = run / m0["link"]
    assert link.is_symlink() and link.resolve() == pathlib.Path(checkpoints[fmt]).resolve()
    assert m0["link"] == ("models/M0.gguf" if fmt == "gguf" else "models/M0")
    last = f"M{iterations + 1}"
    for name in ("sft_baseline", "M1", last):
        exported = run / "models" / name
        assert (exported / "config.json").is_file() and not (exported / "params.json").exists()
        # Every export is self-contained: the tokenizer of M0 (from the GGUF itself for a .gguf M0).
        tok = load_tokenizer(exported)
        assert tok.vocab_size == 32000 and tok.encode("Hello there") == load_tokenizer(SPM).encode("Hello there")
    if iterations:
        assert read_jsonl(run / "iter_1" / "2_responses" / "responses.jsonl", ("id",)) is not None
        assert (run / "iter_1" / "6_dpo" / "done.json").is_file()

    n_prompts = 3 if user_prompts is None else len(USER_PROMPTS)
    if user_prompts is not None:  # evaluated on the user's set, written in alpaca_eval's model_outputs format
        for name in ("sft_baseline", "M1"):
            rows = json.loads((run / "eval" / name / "alpaca_eval.json").read_text())
            assert [(r["instruction"], r["dataset"], r["generator"]) for r in rows] == [
                (p["instruction"], p["dataset"], name) for p in USER_PROMPTS]
            assert all(isinstance(r["output"], str) for r in rows)
    m1 = json.loads((run / "eval" / "M1" / "done.json").read_text())
    match = m1["pairwise"]["sft_baseline"]
    assert match["judge"] == ("tiny.gguf" if judge else "M1 (self)")
    assert match["num_prompts"] == n_prompts and match["judgments"] == 2 * n_prompts
    assert match["win"] + match["tie"] + match["loss"] == pytest.approx(100.0)
    judged = read_jsonl(run / "eval" / "M1" / "pairwise_sft_baseline.jsonl", ("id", "order", "verdict"))
    assert [r["order"] for r in judged] == ["ab", "ba"] * n_prompts
    assert match["unparsable"] == sum(r["verdict"] is None and not r.get("skipped") for r in judged)

    report = (run / "report.md").read_text()
    rows = _pairwise_rows(report)
    expected = {"M1 vs sft_baseline"} | ({f"{last} vs M1", f"{last} vs sft_baseline"} if iterations else set())
    assert {r.split("|")[1].strip() for r in rows} == expected
    assert (run / "plots" / "head_to_head.png").stat().st_size > 1000
    graded = "## Head to head (ground-truth grader" in report
    assert graded == (source == "world")
    if graded:
        assert "one verdict per prompt" in report and "both orders, disagreement = tie)" not in report.split(
            "## Head to head (ground-truth grader")[1]


@pytest.mark.multiproc
def test_pairwise_eval_on_two_ranks_equals_one(checkpoints, tmp_path):
    """M1's evaluation (generations and both orders of pairwise judging, sharded over ranks) redone on
    2 ranks (torchrun, gloo) writes exactly the records the 1-rank run wrote."""
    import os
    import shutil
    import subprocess
    import sys

    config = _config(tmp_path, checkpoints["meta"], "oasst", 0)
    assert main(["--config", str(config)]) == 0
    one, two = tmp_path / "run", tmp_path / "two"
    shutil.copytree(one, two, symlinks=True)
    shutil.rmtree(two / "eval" / "M1")
    repo = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "loop/iterate.py", "--config", str(config), "--run-dir", str(two), "--resume"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rel in ("eval/M1/generations.jsonl", "eval/M1/pairwise_sft_baseline.jsonl"):
        assert read_jsonl(two / rel) == read_jsonl(one / rel), rel
    a, b = (json.loads((r / "eval" / "M1" / "done.json").read_text())["pairwise"] for r in (one, two))
    assert a == b and a["sft_baseline"]["judgments"] == 6
