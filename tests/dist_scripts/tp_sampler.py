"""Launched by tests/test_sampler_tp.py under torchrun (gloo, CPU): the tensor-parallel sampler.

argv: workdir spec. workdir/<spec>.json holds "tp" (the TP sizes to try, each with its own groups) and
"cases" [{name, tp, checkpoint, dtype, block_size, num_blocks, runs: {run name: {prompts, params}}}]; each
case is loaded with load_sampler(tp_group=build_groups(tp)), every run goes through generate_distributed, and
workdir/<spec>_rank<r>.json gets, per TP size and case, the token ids of every run, the block count and the
bytes this rank holds (decoder weights by kind, vocab rows, KV cache).
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine.sampler import SamplingParams, generate_distributed, load_sampler
from engine.sampler.runner import kv_bytes_per_block
from engine.sampler.tensor_parallel import build_groups, plan_tp
from model.checkpoint import open_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

workdir, spec_name = Path(sys.argv[1]), sys.argv[2]
spec = json.loads((workdir / f"{spec_name}.json").read_text())
dist.init_process_group("gloo")
rank = dist.get_rank()
result = {}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_case(case: dict, groups) -> dict:
    dtype = DTYPES[case["dtype"]]
    config = open_checkpoint(case["checkpoint"]).config
    plan = plan_tp(config, groups.tp_rank, groups.tp_size)
    per_block = kv_bytes_per_block(plan.local_config, case["block_size"], dtype)
    sampler = load_sampler(case["checkpoint"], tokenizer=None, dtype=dtype, tp_group=groups,
                           kv_memory=case["num_blocks"] * per_block, block_size=case["block_size"],
                           max_batched_tokens=case.get("max_batched_tokens", 4096))
    out = {"runs": {}}
    for run_name, run in case["runs"].items():
        params = [SamplingParams(**p) for p in run["params"]]
        completions = generate_distributed(sampler, run["prompts"], params)
        out["runs"][run_name] = [c.token_ids for c in completions]
    params = dict(sampler.model.named_parameters())
    backend = sampler.runner.backend
    out.update(
        num_blocks=sampler.block_manager.num_blocks,
        kv_cache_bytes=nbytes(backend.k_caches) + nbytes(backend.v_caches),
        kv_bytes_per_block=per_block,
        local_config=sampler.model.config.to_dict(),
        decoder_bytes={kind: nbytes(p for n, p in params.items() if n.startswith("layers.") and f".{kind}." in n)
                       for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "input_layernorm", "post_attention_layernorm")},
        vocab_bytes=nbytes(p for n, p in params.items() if n in ("embed_tokens.weight", "lm_head.weight")),
        total_bytes=nbytes(params.values()),
    )
    return out


for tp in spec["tp"]:
    groups = build_groups(tp)
    result[f"tp{tp}"] = {"groups": {"tp_rank": groups.tp_rank, "tp_ranks": list(groups.tp_ranks),
                                    "dp_rank": groups.dp_rank, "dp_size": groups.dp_size}}
    for case in spec["cases"]:
        if tp in case["tp"]:
            result[f"tp{tp}"][case["name"]] = run_case(case, groups)

tmp = workdir / f"{spec_name}_rank{rank}.json.tmp"
tmp.write_text(json.dumps(result))
os.replace(tmp, workdir / f"{spec_name}_rank{rank}.json")
dist.barrier()
dist.destroy_process_group()
