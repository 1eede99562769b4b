"""Training across world sizes: 20 SFT and 20 DPO steps on 1 rank (plain torch) and on 2 ranks (ZeRO-3,
gloo) agree step by step within 1e-5 relative.

Batchings: micro_batch 2 of global 4 (1 rank sums two micro-batches, 2 ranks one each: the same
micro-batches, so the only difference is where the sum happens) and micro_batch 4 of global 4 (2 ranks
must lower it to 2: other micro-batches, other padding). Neither is bit-exact after the first update
(see the last test for why); both agree well within the tolerance.
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
SCRIPT = ROOT / "tests" / "dist_scripts" / "world_parity.py"
CFG = dict(lr=2e-3, min_lr=2e-4, global_batch=4, dropout=0.0, grad_clip=1.0, log_every=5, checkpoint_every=0,
           zero_stage=3, seed=5, max_steps=20)
OBJECTIVE = dict(nll_weight=0.5)  # the DPO objective's own section
BATCHINGS = {"same_micro": {"micro_batch": 2}, "derived_micro": {"micro_batch": 4}}


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    work = tmp_path_factory.mktemp("parity")
    config = LlamaConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    save_pretrained(Llama(config).init_weights(0.05, torch.Generator().manual_seed(0)), work / "m0")
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 101, (n,), generator=g).tolist()

    sft = [[ids(2 + i % 5), ids(3 + i % 9)] for i in range(80)]
    pairs = [[f"p{i}", ids(2 + i % 3), ids(3 + i % 6), ids(2 + i % 7)] for i in range(80)]
    (work / "data.json").write_text(json.dumps({"cfg": CFG, "objective": OBJECTIVE, "batchings": BATCHINGS, "sft": sft,
                                                "pairs": pairs}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), str(work), "two"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(SCRIPT), str(work), "one"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    load = lambda name: json.loads((work / name).read_text())
    return load("one_rank0.json"), load("two_rank0.json"), load("two_rank1.json")


@pytest.mark.parametrize("batching", list(BATCHINGS))
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_losses_agree_step_by_step(losses, batching, kind):
    one, two, two_rank1 = losses
    a, b = one[batching][kind], two[batching][kind]
    assert len(a) == len(b) == 20
    assert two_rank1[batching][kind] == b  # every rank reports the same all-rank losses
    assert b == pytest.approx(a, rel=1e-5)
    assert len(set(a)) > 10  # it trains: the losses move


def test_micro_batch_derived_for_two_ranks(losses):
    one, two, _ = losses
    assert one["derived_micro"]["micro_batch"] == [4, 4] and two["derived_micro"]["micro_batch"] == [2, 2]
    assert one["same_micro"]["micro_batch"] == two["same_micro"]["micro_batch"] == [2, 2]


def test_same_micro_batches_agree_to_float_rounding(losses):
    """1 rank summing two micro-batches vs 2 ranks one each: the same gradients, summed exactly (a + b
    on either side), yet not bit-exact: measured, the first step's loss is identical and later ones
    differ in the last bits (clipping on or off), so what differs is the update, not the gradient. The
    optimizer steps over ZeRO-3's flattened fp32 partitions instead of per-parameter tensors, which
    rounds differently; the agreement is 1e-6 relative, well inside the 1e-5 asked for."""
    one, two, _ = losses
    for kind in ("sft", "dpo"):
        a, b = one["same_micro"][kind], two["same_micro"][kind]
        assert b[0] == a[0], kind  # before any update: bit-identical
        assert b == pytest.approx(a, rel=1e-6), kind
        print(f"{kind}: {sum(x != y for x, y in zip(a, b))}/20 steps differ in the last bits")
