"""How many KV blocks the sampler gets: bytes per block, the memory probes, and the arithmetic.

kv_memory > 1 is a byte budget, used as given. A fraction in (0, 1] is a share of what is left once the
largest step fits: on CUDA the runner first runs one warm-up step at the largest batch the scheduler can
form (engine/sampler/runner.py, ModelRunner.profile) and the probe reports its peak allocation above what
was resident before it (torch.cuda.max_memory_allocated); the budget is then
    kv_memory x (free device memory after the warm-up - that peak).
The host has no allocator peak counter to reset, so on CPU there is no warm-up: the budget is
kv_memory x available RAM (psutil, else os.sysconf), capped at HOST_CAP, which leaves host RAM far beyond
what a CPU forward needs. Either way the block count never exceeds every sequence slot filled to the
context window (more would only lengthen the prefix cache).
"""
from __future__ import annotations

import os

import torch

HOST_CAP = 2 << 30  # a fraction of host RAM can be tens of GB; the CPU sampler never needs that


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8
    return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * elem


def is_fraction(kv_memory) -> bool:
    if isinstance(kv_memory, float) and 0.0 < kv_memory <= 1.0:
        return True
    if isinstance(kv_memory, (int, float)) and not isinstance(kv_memory, bool) and kv_memory > 1:
        return False
    raise ValueError(f"sampler: kv_memory={kv_memory!r} must be bytes (> 1) or a fraction in (0, 1]")


def num_kv_blocks(kv_memory: float | int, per_block: int, max_useful: int, free_bytes: int = 0,
                  activation_bytes: int = 0, cap: int | None = None) -> int:
    """Blocks for a budget: kv_memory bytes, or kv_memory x (free_bytes - activation_bytes), capped at cap
    bytes; never more than max_useful blocks."""
    if is_fraction(kv_memory):
        budget = int(max(0, free_bytes - activation_bytes) * kv_memory)
        if cap is not None:
            budget = min(budget, cap)
    else:
        budget = int(kv_memory)
    num_blocks = min(budget // per_block, max_useful)
    if num_blocks < 1:
        raise ValueError(f"sampler: kv_memory={kv_memory!r} holds no KV block ({per_block} bytes each)")
    return num_blocks


class CudaMemory:
    """Device memory as the caching allocator sees it."""

    profiles = True  # a warm-up step is measured
    cap = None

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        """Bytes allocated at the peak since start(), above what was allocated at start()."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base

    def free(self) -> int:
        torch.cuda.empty_cache()  # the warm-up's cached blocks are not the KV cache's to lose
        return torch.cuda.mem_get_info(self.device)[0]


class HostMemory:
    """Host RAM: available bytes only (see the module docstring)."""

    profiles = False
    cap = HOST_CAP

    def start(self) -> None:
        pass

    def peak(self) -> int:
        return 0

    def free(self) -> int:
        try:
            import psutil
        except ImportError:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return psutil.virtual_memory().available


def memory_probe(device: torch.device):
    return CudaMemory(device) if device.type == "cuda" else HostMemory()
