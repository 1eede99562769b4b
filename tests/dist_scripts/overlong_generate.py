"""Launched by tests/test_loop_overlong.py under `torchrun --nproc_per_node=2` (gloo, CPU), and run by the
test itself in one process: one stage's generation over requests some of which do not fit the context,
through StageDir, then the same call again (a resumed stage). Rank 0 writes workdir/<tag>.json.

argv: workdir tag
"""
import json
import sys
from pathlib import Path

import torch

from engine.distributed import init_distributed
from engine.sampler import Sampler, SamplingParams
from loop.generation import generate_records, read_skipped
from loop.stage_dir import StageDir
from model.config import preset
from model.llama import Llama

CONTEXT, MAX_NEW = 48, 6
# lengths around the limit: 42 + 6 = 48 fits exactly, 43 + 6 does not; 60 would make the sampler raise
LENGTHS = [5, 43, 12, 42, 60, 7, 47, 3, 20]


def requests():
    g = torch.Generator().manual_seed(0)
    return [{"id": f"r{i}", "ids": torch.randint(1, 64, (n,), generator=g).tolist(), "seed": 100 + i}
            for i, n in enumerate(LENGTHS)]


def main(workdir: Path, tag: str) -> None:
    dist = init_distributed(use_deepspeed=False)
    cfg = preset("tiny", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64,
                 max_seq_len=CONTEXT, eos_token_id=None, tie_embeddings=False)
    model = Llama(cfg).init_weights(std=0.1, generator=torch.Generator().manual_seed(0)).eval()
    sampler = Sampler(model, kv_memory=1 << 20, block_size=4, cuda_graphs=False)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=MAX_NEW, n=2)

    def record(req, c, rid):
        return {"id": rid, "request_id": req["id"], "tokens": list(c.token_ids)}

    st = StageDir(workdir / tag / "stage", dist)
    work = st.begin()
    first = generate_records(sampler, dist, requests(), params, work / "out.jsonl", chunk_size=4, make_record=record)
    again = generate_records(sampler, dist, requests(), params, work / "out.jsonl", chunk_size=4, make_record=record)
    summary = st.finish({"records": len(first)})
    if dist.is_main:
        (workdir / f"{tag}.json").write_text(json.dumps({
            "first": first, "again": again, "summary": summary,
            "skipped": read_skipped(st.final / "out.jsonl"),
            "on_disk": [json.loads(line) for line in open(st.final / "out.jsonl")]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
