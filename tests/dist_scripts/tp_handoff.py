"""Launched by tests/test_handoff.py under `torchrun --nproc_per_node=2` (gloo, CPU, ZeRO-3).

argv: workdir. SFT of workdir/m0 for a few steps with the weights handed over in memory as TP=2 slices;
this rank's sampler is then built three ways: from the handed-over slices, from the export on disk with
the same TP groups, and the whole model from disk (TP=1). workdir/handoff_rank<r>.json gets the greedy
token ids of each, and the bytes: kept by the hand-off, expected from the shard plan, the full model,
and the most gathered at once during the walk.
"""
import json
import sys
from pathlib import Path

from engine.config import TrainConfig
from engine.data import SFTExample
from engine.distributed import init_distributed
from engine.handoff import HandoffRequest
from engine.sampler import Sampler, SamplingParams, generate_distributed, load_sampler
from engine.sampler.tensor_parallel import build_groups, build_tp_model, plan_tp
from engine.trainer import train_sft
from model.checkpoint import open_checkpoint

workdir = Path(sys.argv[1])
data = json.loads((workdir / "data.json").read_text())
dist = init_distributed(use_deepspeed=True)
groups = build_groups(2)


def plan(config):
    return plan_tp(config, groups.tp_rank, groups.tp_size).shard


result = train_sft(workdir / "m0", [SFTExample(*e) for e in data["sft"]], TrainConfig(**data["cfg"]),
                   workdir / "m1", resume=False, handoff=HandoffRequest(plan=plan))
handed = result.handoff
params = SamplingParams(temperature=0.0, max_new_tokens=8)
kw = dict(tokenizer=None, kv_memory=4 << 20, max_num_seqs=8)

out = {"kept_bytes": handed.kept_bytes, "peak_gathered_bytes": handed.peak_gathered_bytes, "sharded": handed.sharded}
reader = open_checkpoint(workdir / "m1")
shard = plan(reader.config)
out["plan_bytes"] = sum(shard(n, reader.get(n)).numel() * 4 for n in reader.names())
out["full_bytes"] = sum(reader.get(n).numel() * 4 for n in reader.names())
out["largest_param_bytes"] = max(reader.get(n).numel() * 4 for n in reader.names())

model = build_tp_model(handed.config, groups, handed.tensors.pop, sharded=True).eval()
out["from_handoff"] = [c.token_ids for c in generate_distributed(Sampler(model, **kw), data["prompts"], params)]
del model
disk = load_sampler(workdir / "m1", tp_group=groups, **kw)
out["from_disk_tp2"] = [c.token_ids for c in generate_distributed(disk, data["prompts"], params)]
del disk
whole = load_sampler(workdir / "m1", **kw)
out["from_disk_tp1"] = [c.token_ids for c in whole.generate(data["prompts"], params)]
(workdir / f"handoff_rank{dist.rank}.json").write_text(json.dumps(out))
