"""Trainer -> sampler hand-off in memory against a reload of the export from disk, and memory per phase.

    torchrun --nproc_per_node=2 bench/handoff.py [--dim 1024 --layers 8 --vocab 32000]   # CPU, gloo, ZeRO-3
    torchrun --nproc_per_node=1 bench/handoff.py                                          # one GPU (TP=1)

Each rank trains a few SFT steps of a random Llama under the trainer (ZeRO-3 on several ranks), asks
for its sampler weights in memory (engine/handoff.py), then builds the sampler from them; the same
sampler is then built from the HF export on disk (what the loop did before), in the same run. Both are
timed until every weight has been read once (a memory-mapped reload otherwise defers its reads to the
first forward). The hand-off's walk also makes rank 0's export copy, which the loop writes either way.
Printed per rank: seconds for each path and the ratio, and resident memory (CPU: process RSS; GPU:
allocated and peak) after each phase. The export was just written, so the reload reads the page cache:
on CPU this is the reload's best case; on a GPU it adds the host-to-device copy of every weight.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"allocated_GiB": torch.cuda.memory_allocated(device) / 2**30,
                "peak_GiB": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil

    return {"rss_GiB": psutil.Process().memory_info().rss / 2**30}


def touch(model) -> None:
    """Read every weight once: a memory-mapped checkpoint is otherwise only read at the first forward."""
    total = sum(float(p.float().sum()) for p in model.parameters())
    if total != total:
        raise RuntimeError("NaN weights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

    from engine.config import TrainConfig
    from engine.data import SFTExample
    from engine.distributed import barrier, init_distributed
    from engine.handoff import HandoffRequest
    from engine.sampler import Sampler, load_sampler
    from engine.trainer import train_sft
    from model.checkpoint import save_pretrained
    from model.config import LlamaConfig
    from model.llama import Llama
    from model.weight_loading import materialize

    world = int(os.environ.get("WORLD_SIZE", 1))
    dist = init_distributed(use_deepspeed=world > 1)
    # one folder for all ranks (a per-rank mkdtemp would split them)
    work = Path(args.workdir or Path(tempfile.gettempdir()) / f"handoff-{args.dim}x{args.layers}-v{args.vocab}")
    config = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                         n_kv_heads=max(1, args.dim // 256), ffn_dim=int(args.dim * 8 / 3) // 64 * 64, max_seq_len=256)
    m0 = work / "m0"
    if dist.is_main and not (m0 / "config.json").exists():
        save_pretrained(Llama(config).init_weights(0.02, torch.Generator().manual_seed(0)), m0)
    barrier()
    g = torch.Generator().manual_seed(1)
    examples = [SFTExample(torch.randint(3, args.vocab, (16,), generator=g).tolist(),
                           torch.randint(3, args.vocab, (16,), generator=g).tolist()) for _ in range(4 * args.steps)]
    cfg = TrainConfig(lr=1e-4, min_lr=1e-5, global_batch=4, micro_batch=4 // world if world <= 4 else 1,
                      max_steps=args.steps, checkpoint_every=0, dropout=0.0, log_every=args.steps,
                      zero_stage=3, param_persistence_threshold=0)
    dtype = torch.bfloat16 if dist.device.type == "cuda" else torch.float32
    phases = {"start": memory(dist.device)}
    result = train_sft(m0, examples, cfg, work / "m1", resume=False,
                       handoff=HandoffRequest(dtype=dtype, device=dist.device))
    phases["after training (engine and optimizer freed, hand-off held)"] = memory(dist.device)
    handed = result.handoff
    t0 = time.perf_counter()
    model = materialize(handed.reader(), None, dist.device)
    sampler = Sampler(model.eval(), kv_memory=64 << 20, max_num_seqs=8)
    touch(model)
    build_s = time.perf_counter() - t0
    phases["sampler from hand-off"] = memory(dist.device)
    del sampler, model
    barrier()
    t0 = time.perf_counter()
    sampler = load_sampler(work / "m1", tokenizer=None, dtype=dtype, device=dist.device, kv_memory=64 << 20,
                           max_num_seqs=8)
    touch(sampler.model)
    disk_s = time.perf_counter() - t0
    phases["sampler from disk"] = memory(dist.device)
    del sampler
    row = {"rank": dist.rank, "world": world, "params_M": config.num_params() / 1e6,
           "handoff_walk_s": handed.seconds, "handoff_build_s": build_s, "handoff_total_s": handed.seconds + build_s,
           "disk_reload_s": disk_s, "ratio_handoff_over_disk": (handed.seconds + build_s) / disk_s,
           "peak_gathered_MiB": handed.peak_gathered_bytes / 2**20, "kept_MiB": handed.kept_bytes / 2**20,
           "memory": phases}
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, row)
    else:
        gathered = [row]
    if dist.is_main:
        for r in gathered:
            print(json.dumps(r))
        print("| rank | params (M) | hand-off walk s | build s | total s | disk reload s | ratio | peak gathered MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in gathered:
            print(f"| {r['rank']} | {r['params_M']:.1f} | {r['handoff_walk_s']:.3f} | {r['handoff_build_s']:.3f} | "
                  f"{r['handoff_total_s']:.3f} | {r['disk_reload_s']:.3f} | {r['ratio_handoff_over_disk']:.2f} | "
                  f"{r['peak_gathered_MiB']:.1f} |")


if __name__ == "__main__":
    main()
