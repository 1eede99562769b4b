"""Launched by tests/test_world_size_parity.py under `torchrun --nproc_per_node=2` (gloo, CPU), and run
by the test itself in one process: 20 SFT and 20 DPO steps for each batching in data.json, losses to
workdir/<tag>_rank<r>.json (tag "one" in one process, "two" under torchrun).

argv: workdir tag
"""
import json
import sys
from pathlib import Path

from engine.config import DPOConfig, TrainConfig
from engine.data import PreferencePair, SFTExample
from engine.distributed import init_distributed
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft


def main(workdir: Path, tag: str) -> None:
    data = json.loads((workdir / "data.json").read_text())
    examples = [SFTExample(*e) for e in data["sft"]]
    pairs = [PreferencePair(*p) for p in data["pairs"]]
    dist = init_distributed(use_deepspeed=tag == "two")
    out = {}
    for name, batching in data["batchings"].items():
        cfg = TrainConfig(**{**data["cfg"], **batching})
        sft = train_sft(workdir / "m0", examples, cfg, workdir / f"{tag}_{name}_sft", resume=False)
        ref = compute_reference_logprobs(workdir / "m0", pairs, cfg)
        dpo_cfg = DPOConfig.extend(cfg, **data["objective"])
        dpo = train_dpo(workdir / "m0", ref, dpo_cfg, workdir / f"{tag}_{name}_dpo", resume=False)
        out[name] = {"sft": sft.losses, "dpo": dpo.losses, "micro_batch": [sft.micro_batch, dpo.micro_batch]}
    (workdir / f"{tag}_rank{dist.rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
