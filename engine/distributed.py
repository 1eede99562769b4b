"""Process-group setup from torchrun's environment, rank-aware logging and per-rank seeding.

NCCL on CUDA, gloo on CPU (DeepSpeed with DS_ACCELERATOR=cpu). A single process without torchrun
works too: it gets a world of one on a free local port, because DeepSpeed always wants a group.
DeepSpeed is optional: without it (e.g. a bare GPU box) the plain torch backend still runs.
"""
from __future__ import annotations

import importlib.util
import os
import random
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_deepspeed: bool | None = None) -> Dist:
    """Join (or create) the default process group; idempotent.

    use_deepspeed None means "if installed and there are several ranks": a world of one trains with
    plain torch (engine/train_backends.py), so it need not pay DeepSpeed's comm setup (which compiles an op on
    CPU the first time). Without torchrun this is a world of one."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_deepspeed is None:
        use_deepspeed = world_size > 1 and deepspeed_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not (world_size > 1 or use_deepspeed):
        return Dist(rank, world_size, local_rank, device, rank == 0)
    if "MASTER_ADDR" not in os.environ:  # not launched by torchrun: a private world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                          RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    backend = "nccl" if cuda else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # idempotent; adopts a torch group
    elif not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device, rank == 0)


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch/CUDA/python per rank, so dropout masks differ across ranks but replay on resume."""
    s = seed * 1000 + rank
    random.seed(s)
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def log(dist: Dist, msg: str) -> None:
    """Print on rank 0 only, with a wall-clock stamp."""
    if dist.is_main:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
