"""A bound on oneDNN's per-shape primitive caches, the CPU's main source of training-time memory growth.

On the CPU, bf16 matmuls run through oneDNN, and PyTorch keeps two caches of built oneDNN primitives with
one entry per matmul shape: ideep's (LRU_CACHE_CAPACITY) and oneDNN's own (ONEDNN_PRIMITIVE_CACHE_CAPACITY),
1,024 entries each by default. Batches of varying length make new shapes at every step, so both caches keep
filling. Measured with torch 2.13 on this CPU:
- one bf16 linear (256 -> 688) run forward and backward over 143 shapes keeps 248 MB in the caches; bounded
  at 16 entries, it keeps 10 MB;
- bench/dpo_vs_trl.py in bf16 grows 406-432 MB at the default capacities and 218-233 MB at 16, with no loss
  of tokens/s (RESULTS, 2026-12-04, session 11).
One step builds about a dozen primitives, so 16 entries hold a step's shapes, and a sampler's decode shapes
while they repeat. Both libraries read the capacity once, when they build their first primitive. So the
bound must be in the environment before the process runs its first bf16 op: `import engine` sets it, and
a value the user already exported wins. Only the CPU is affected; CUDA matmuls do not use these caches.
"""
from __future__ import annotations

import os

CAPACITY = 16  # entries per cache
KEYS = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def bound_primitive_caches(capacity: int = CAPACITY) -> None:
    """Export the bound unless the user set one; effective only before the process's first oneDNN op."""
    for key in KEYS:
        os.environ.setdefault(key, str(capacity))
