"""2-rank ZeRO-3 (torchrun, gloo, CPU) against a 1-process plain torch run of the same stage.

Two torchrun launches in all (they dominate the time): "main" trains SFT + DPO under ZeRO-3, checks
partitioning, the sampler hand-off and the fused op's weight, then is killed mid-run; "resume"
finishes the killed run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import TrainConfig
from engine.data import PreferencePair, SFTExample
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft
from model.checkpoint import load_pretrained, save_pretrained
from model.config import LlamaConfig
from model.llama import Llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_scripts" / "zero3_train.py"
CFG = dict(lr=1e-3, min_lr=1e-4, global_batch=8, micro_batch=2, dropout=0.0, weight_decay=0.01, grad_clip=1.0,
           log_every=2, checkpoint_every=0, zero_stage=3, backend="deepspeed", seed=3)


def make_model(directory: Path, tied: bool) -> None:
    config = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                         tie_embeddings=tied)
    save_pretrained(Llama(config).init_weights(0.05, torch.Generator().manual_seed(int(tied))), directory)


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 96, (n,), generator=g).tolist()

    sft = [[ids(2 + i % 5), ids(3 + i % 7)] for i in range(32)]
    pairs = [[f"p{i}", ids(2 + i % 3), ids(3 + i % 4), ids(2 + i % 5)] for i in range(24)]
    return sft, pairs


def torchrun(workdir: Path, phase: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(workdir), phase]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("zero3")
    make_model(work / "m0", tied=False)
    make_model(work / "m0_tied", tied=True)
    sft, pairs = make_data()
    (work / "data.json").write_text(json.dumps({"cfg": CFG, "sft": sft, "pairs": pairs}))
    main = torchrun(work, "main")
    assert main.returncode != 0 and (work / "main_rank1.json").exists(), main.stderr[-3000:]
    resume = torchrun(work, "resume")
    assert resume.returncode == 0, resume.stderr[-3000:]
    load = lambda name: [json.loads((work / f"{name}_rank{r}.json").read_text()) for r in range(2)]
    return work, load("main"), load("resume")


@pytest.fixture(scope="module")
def reference(runs):
    """The same stages in this process with the plain torch backend (world of one)."""
    work = runs[0]
    data = json.loads((work / "data.json").read_text())
    cfg = TrainConfig(**{**data["cfg"], "backend": "torch"})
    sft = train_sft(work / "m0", [SFTExample(*e) for e in data["sft"]], cfg, work / "sft_torch", resume=False)
    pairs = compute_reference_logprobs(work / "m0_tied", [PreferencePair(*p) for p in data["pairs"]], cfg)
    dpo = train_dpo(work / "m0_tied", pairs, cfg.replace(lr=cfg.lr / 2), work / "dpo_torch", resume=False)
    return sft, dpo, pairs


@pytest.mark.multiproc
def test_zero3_sft_and_dpo_match_plain_torch(runs, reference):
    work, main, _ = runs
    sft, dpo, pairs = reference
    for rank_result in main:  # every rank reports the same all-rank losses
        assert len(rank_result["sft_losses"]) == 4 and len(rank_result["dpo_losses"]) == 3
        assert rank_result["sft_losses"] == pytest.approx(sft.losses, abs=1e-5)
        assert rank_result["dpo_losses"] == pytest.approx(dpo.losses, abs=1e-5)
    assert dpo.losses[0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 0
    ref = [[p.ref_chosen, p.ref_rejected] for p in pairs]
    assert torch.allclose(torch.tensor(main[0]["ref"]), torch.tensor(ref), atol=1e-5)
    for stage, init in (("sft", "m0"), ("dpo", "m0_tied")):
        z3, plain = load_file(work / f"{stage}_z3" / "model.safetensors"), load_file(
            work / f"{stage}_torch" / "model.safetensors")
        assert z3.keys() == plain.keys()
        start = load_file(work / init / "model.safetensors")
        moved = max((plain[k] - start[k]).abs().max().item() for k in plain)
        assert moved > 1e-3  # it trained: the comparison below is not between two untouched copies
        for k in plain:
            assert torch.allclose(z3[k], plain[k], atol=1e-5, rtol=0), k


@pytest.mark.multiproc
def test_zero3_partitions_parameters_and_gathers_lm_head(runs):
    work, main, _ = runs
    config = load_pretrained(work / "m0").config
    for r in main:
        assert r["numel_full"] == config.num_params()
        assert 0.49 < r["numel_local"] / r["numel_full"] < 0.52  # each rank holds ~half
        assert r["weight_shapes"] and all(s == [config.vocab_size, config.dim] for s in r["weight_shapes"])
        assert r["handoff_full"] and r["handoff_released"]
    model = load_pretrained(work / "m0")
    x = torch.arange(8).reshape(1, 8) % config.vocab_size
    assert main[0]["handoff_logits_sum"] == pytest.approx(model(x).double().sum().item(), rel=1e-5)


@pytest.mark.multiproc
def test_zero3_kill_and_resume_matches_uninterrupted(runs):
    work, main, resume = runs
    full, resumed = main[0]["full_losses"], resume[0]["resumed_losses"]
    assert len(full) == len(resumed) == 4
    assert resumed == full  # bit-for-bit on CPU: same data position, optimizer, schedule and dropout RNG
    assert (work / "sft_killed" / "model.safetensors").exists()
