"""Launched by tests/test_metrics_log.py under `torchrun --nproc_per_node=2` (gloo, CPU).

argv: workdir, holding m0/ (an HF checkpoint) and data.json. Every rank holds a MetricsSink on the same
workdir/run (jsonl + TensorBoard) and hands it to a ZeRO-3 SFT and DPO stage: the trainer must write
from rank 0 only, so the test finds each step once and one event file per stage.
"""
import json
import sys
from pathlib import Path

from engine.config import TrainConfig
from engine.data import PreferencePair, SFTExample
from engine.distributed import barrier, init_distributed
from engine.metrics_log import MetricsSink
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft

workdir = Path(sys.argv[1])
data = json.loads((workdir / "data.json").read_text())
cfg = TrainConfig(**data["cfg"])
dist = init_distributed(use_deepspeed=True)
run = workdir / "run"
sink = MetricsSink(run, ["jsonl", "tensorboard"])
train_sft(workdir / "m0", [SFTExample(*e) for e in data["sft"]], cfg.replace(max_steps=3), workdir / "sft",
          resume=False, sink=sink.stage("sft/M1"))
pairs = compute_reference_logprobs(workdir / "m0", [PreferencePair(*p) for p in data["pairs"]], cfg)
train_dpo(workdir / "m0", pairs, cfg.replace(max_steps=3), workdir / "dpo", resume=False,
          sink=sink.stage("iter_1/6_dpo"))
sink.close()
barrier()
