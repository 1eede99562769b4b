"""The trainer's weights handed to a tensor-parallel sampler in memory (engine/handoff.py), under ZeRO-3 on
2 gloo ranks: each rank keeps exactly its TP=2 slice (about half the model), the walk never holds more
than one full parameter beyond the partitions, and the sampler built from the slices generates exactly
what the same TP groups generate from the export on disk, and what one rank with the whole model does.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_pretrained
from model.config import LlamaConfig
from model.llama import Llama

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_scripts" / "tp_handoff.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    work = tmp_path_factory.mktemp("handoff")
    # GQA 4/2 heads, an odd vocabulary (the vocab-parallel slices are padded), untied lm_head
    config = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    save_pretrained(Llama(config).init_weights(0.2, torch.Generator().manual_seed(0)), work / "m0")
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 97, (n,), generator=g).tolist()

    data = {"cfg": dict(lr=5e-3, min_lr=5e-4, global_batch=4, micro_batch=2, max_steps=3, dropout=0.0,
                        checkpoint_every=0, zero_stage=3, log_every=3),
            "sft": [[ids(3 + i % 4), ids(4 + i % 5)] for i in range(12)],
            "prompts": [ids(2 + i % 6) for i in range(6)]}
    (work / "data.json").write_text(json.dumps(data))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), str(work)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((work / f"handoff_rank{r}.json").read_text()) for r in range(2)]


def test_each_rank_keeps_its_tensor_parallel_slice(ranks):
    for r in ranks:
        assert r["sharded"] and r["kept_bytes"] == r["plan_bytes"]
        assert 0.45 * r["full_bytes"] < r["kept_bytes"] < 0.55 * r["full_bytes"]  # half, plus norms and padding


def test_walk_holds_one_full_parameter_at_most(ranks):
    for r in ranks:
        assert 0 < r["peak_gathered_bytes"] <= r["largest_param_bytes"] < r["full_bytes"] / 4


def test_handed_over_slices_generate_like_the_export(ranks):
    for r in ranks:
        assert r["from_handoff"] == r["from_disk_tp2"] == r["from_disk_tp1"]
        assert all(1 <= len(t) <= 8 for t in r["from_handoff"]) and sum(map(len, r["from_handoff"])) > 24
    assert ranks[0]["from_handoff"] == ranks[1]["from_handoff"]
