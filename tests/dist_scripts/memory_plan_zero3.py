"""Launched by tests/test_memory_plan.py under `torchrun --nproc_per_node=2` (gloo, CPU).

argv: model_dir out_prefix. Builds the trainer's DeepSpeed ZeRO-3 runner (fp32 on CPU), takes one optimizer
step so AdamW's state exists, and writes what this rank holds to out_prefix.rank<r>.json: the parameter
partitions, the fp32 master partitions and the AdamW state, each tensor storage counted once (a master that shared the parameter partition's
storage would not be counted twice).
"""
import json
import sys
from pathlib import Path

import torch

from engine.config import TrainConfig
from engine.data import SFTExample, collate_sft
from engine.distributed import init_distributed
from engine.train_backends import DeepSpeedRunner
from engine.objectives import SFTObjective
from engine.zero3 import local_numel, open_init

model_dir, out = sys.argv[1], sys.argv[2]
dist = init_distributed(use_deepspeed=True)
cfg = TrainConfig(global_batch=2 * dist.world_size, micro_batch=2, dropout=0.0, backend="deepspeed", zero_stage=3)
runner = DeepSpeedRunner(open_init(model_dir, 0.0), cfg, dist, torch.float32, total_steps=4)
runner.train(True)
g = torch.Generator().manual_seed(dist.rank)
ids = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()
batch = collate_sft([SFTExample(ids(8), ids(24)) for _ in range(2)], max_len=64, device=dist.device)
logp_sum, count = runner.forward(batch["input_ids"], batch["targets"], batch["mask"])
runner.backward(SFTObjective().loss(batch, logp_sum, count, batch["num_tokens"] * dist.world_size))
runner.step()

seen: set[int] = set()


def held(tensors) -> int:
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


zero_opt = runner.engine.optimizer
params = held(p.ds_tensor for p in runner.module.parameters())
master = held(zero_opt.fp32_partitioned_groups_flat)
adam = held(v for s in zero_opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
local, full = local_numel(runner.module)
Path(f"{out}.rank{dist.rank}").write_text(json.dumps(dict(params=params, master=master, adam=adam, local_numel=local,
                                                          full_numel=full, world=dist.world_size)))
# An orderly teardown: exiting with DeepSpeed's engine and the gloo group alive once aborted a rank in CI
# ("terminate called without an active exception", SIGABRT) after everything above had passed.
runner.close()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
