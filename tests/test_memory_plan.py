"""engine/memory_plan.py against what is measured: the bytes 2 ZeRO-3 ranks really hold (torchrun, gloo,
CPU), the 1.1B single-GPU peak of bench/RESULTS.md, the sampler's own shard and cache sizes; and the
presets fit the nodes they name (bench/memory_plan.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.memory_plan import NODES, count_params, generation_bytes, zero3_state_bytes
from model.checkpoint import save_pretrained
from model.config import LlamaConfig, preset
from model.llama import Llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_scripts" / "memory_plan_zero3.py"
sys.path.insert(0, str(ROOT))


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m", "llama2-70b", "llama3-8b"])
def test_meta_count_matches_the_config_formula(name):
    c = preset(name)
    counts = count_params(c)
    assert counts.total == c.num_params()
    assert counts.output == c.vocab_size * c.dim
    assert c.n_layers * counts.largest_layer + c.dim + c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) \
        == counts.total


def test_zero3_two_ranks_hold_what_the_plan_says(tmp_path):
    config = LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=344, max_seq_len=64)
    save_pretrained(Llama(config).init_weights(0.02, torch.Generator().manual_seed(0)), tmp_path / "m")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(tmp_path / "m"), str(tmp_path / "mem")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"mem.rank{r}").read_text()) for r in range(2)]
    P = count_params(config).total
    plan = zero3_state_bytes(P, 2, param_bytes=4)  # fp32 on CPU
    for held in ranks:
        assert held["full_numel"] == P
        for key in ("params", "master", "adam"):
            assert abs(held[key] / plan[key] - 1) < 0.03, (key, held, plan)
        assert abs(sum(held[k] for k in plan) / sum(plan.values()) - 1) < 0.03
    # and the same plan in bf16 (the GPU case) is the 2 + 4 + 8 bytes per parameter of ZeRO-3 over 2 ranks
    assert sum(zero3_state_bytes(P, 2, param_bytes=2).values()) == 14 * (P // 2)


def test_plan_of_the_1p1b_peak_is_within_15_percent():
    from bench.memory_plan import check_1p1b

    plan, measured = check_1p1b()
    assert 0.85 < plan / measured < 1.15, (plan, measured)


def test_generation_shard_and_cache_follow_the_sampler():
    from engine.sampler.runner import kv_bytes_per_block

    c = preset("llama3-8b")
    one = generation_bytes(c, 1, 16, 1024, torch.bfloat16)
    eight = generation_bytes(c, 8, 16, 1024, torch.bfloat16)
    assert one["weights (TP shard)"] == 2 * c.num_params()
    # 8 KV heads on 8 ranks: one each; the weights split but for the replicated norms and the vocab padding
    assert eight["KV cache"] * 8 == one["KV cache"]
    assert one["KV cache"] == (16 * (c.max_seq_len // 16) + 1) * kv_bytes_per_block(c, 16, torch.bfloat16)
    assert 1 / 8 < eight["weights (TP shard)"] / one["weights (TP shard)"] < 1.01 / 8
    # fewer KV heads than ranks: each rank keeps a whole (replicated) KV head
    tiny = preset("tiny")  # 4 KV heads
    assert generation_bytes(tiny, 8, 16, 256, torch.bfloat16)["KV cache"] * 4 == \
        generation_bytes(tiny, 1, 16, 256, torch.bfloat16)["KV cache"]


@pytest.mark.parametrize("name", ["llama2_70b_8xa100", "llama3_8b_8xa100", "llama2_7b_8xa100"])
def test_presets_fit_the_nodes_they_name(name):
    from bench.memory_plan import plan_config

    rows = plan_config(ROOT / "configs" / f"{name}.yaml")
    assert {r["phase"] for r in rows} == {"sft train", "dpo train", "generation"}
    for r in rows:
        for node in NODES:
            assert r["fits"][node.name], (r["phase"], node.name, {k: v / 2**30 for k, v in r["parts"].items()})


def test_70b_needs_more_than_one_a100_node():
    from bench.memory_plan import plan_config

    sft = next(r for r in plan_config(ROOT / "configs" / "llama2_70b_8xa100.yaml") if r["phase"] == "sft train")
    assert sft["fewest"]["A100-80GB"] == 2  # the offloaded optimizer state overflows one node's host memory
    assert sft["fewest"]["H100-80GB"] == 1  # a 2 TiB host holds it
