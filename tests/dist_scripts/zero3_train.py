"""Launched by tests/test_trainer_dist.py under `torchrun --nproc_per_node=2` (gloo, CPU).

argv: workdir phase. workdir holds m0/ and m0_tied/ (HF checkpoints) and data.json; results go to
workdir/<phase>_rank<r>.json.
  phase "main":   ZeRO-3 SFT + DPO (fp32, dropout 0) for parity with a 1-process torch run, partition
                  and hand-off checks, the fused op's weight shapes, an uninterrupted SFT run with dropout,
                  and last the same run killed (os._exit) after step 3 (checkpoint at step 2).
  phase "resume": the killed run resumed from its checkpoint.
"""
import json
import os
import sys
from pathlib import Path

import torch

import kernels
from engine.config import TrainConfig
from engine.data import PreferencePair, SFTExample
from engine.distributed import init_distributed
from engine.ds_config import build_ds_config
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft
from engine.zero3 import build_partitioned, full_weights, local_numel, open_init

workdir, phase = Path(sys.argv[1]), sys.argv[2]
data = json.loads((workdir / "data.json").read_text())
cfg = TrainConfig(**data["cfg"])
examples = [SFTExample(*e) for e in data["sft"]]
pairs = [PreferencePair(*p) for p in data["pairs"]]
m0 = workdir / "m0"
dist = init_distributed(use_deepspeed=True)
result = {}

def resilient_cfg():
    return cfg.replace(dropout=0.1, checkpoint_every=2, keep_checkpoints=True)

if phase == "main":
    # the fused op must always see the gathered [V, H] output weight
    shapes = []
    real = kernels.sequence_logprobs

    def spy(hidden, weight, *args, **kwargs):
        shapes.append(list(weight.shape))
        return real(hidden, weight, *args, **kwargs)

    kernels.sequence_logprobs = spy
    sft = train_sft(m0, examples, cfg, workdir / "sft_z3", resume=False)
    # DPO on the tied-embedding model: the output weight is then also the embedding's own parameter
    ref_pairs = compute_reference_logprobs(workdir / "m0_tied", pairs, cfg)
    dpo = train_dpo(workdir / "m0_tied", ref_pairs, cfg.replace(lr=cfg.lr / 2), workdir / "dpo_z3", resume=False)
    kernels.sequence_logprobs = real
    result.update(sft_losses=sft.losses, dpo_losses=dpo.losses, dpo_metrics=dpo.metrics, weight_shapes=shapes,
                  ref=[[p.ref_chosen, p.ref_rejected] for p in ref_pairs])

    reader = open_init(m0)
    config = reader.config
    ds_config = build_ds_config(cfg, dist.world_size, torch.float32, on_cuda=False)
    model = build_partitioned(reader, ds_config, dist.device, dist.rank)
    result["numel_local"], result["numel_full"] = local_numel(model)
    with full_weights(model):
        result["handoff_full"] = all(p.numel() == p.ds_numel for p in model.parameters())
        x = torch.arange(8).reshape(1, 8) % config.vocab_size
        result["handoff_logits_sum"] = model(x).double().sum().item()
    result["handoff_released"] = all(p.numel() == 0 for p in model.parameters())

    full = train_sft(m0, examples, resilient_cfg(), workdir / "sft_full", resume=False)
    result["full_losses"] = full.losses
    (workdir / f"{phase}_rank{dist.rank}.json").write_text(json.dumps(result))

    def kill(step):
        if step == 3:
            os._exit(17)  # no cleanup, no export: as if the job were killed

    train_sft(m0, examples, resilient_cfg(), workdir / "sft_killed", resume=True, on_step=kill)
    raise SystemExit("the killed run was not killed")

if phase == "resume":
    resumed = train_sft(m0, examples, resilient_cfg(), workdir / "sft_killed", resume=True)
    result["resumed_losses"] = resumed.losses
    (workdir / f"{phase}_rank{dist.rank}.json").write_text(json.dumps(result))
