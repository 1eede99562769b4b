"""engine/cpu_caches.py: importing engine bounds oneDNN's per-shape caches before any bf16 op.

Each case runs in a fresh interpreter (the caches read their capacity once per process) with both keys
removed from the environment, trains one bf16 linear over 120 shapes and reads the heap bytes in use
(glibc's mallinfo2) before and after."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cpu_caches import CAPACITY, KEYS

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import ctypes, json, os, sys
import torch
if sys.argv[1] == "engine":
    import engine  # noqa: F401
torch.set_num_threads(1)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def in_use():
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd

w = torch.randn(688, 256, dtype=torch.bfloat16, requires_grad=True)
before = in_use()
for rows in range(200, 200 + 120 * 3, 3):  # a new shape every step, as batches of varying length make
    x = torch.randn(rows, 256, dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.linear(x, w).sum().backward()
    del x
print(json.dumps({"growth_mb": (in_use() - before) / 2**20, "env": {k: os.environ.get(k) for k in sys.argv[2:]}}))
"""


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def _probe(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in KEYS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, *KEYS], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="mallinfo2 needs glibc >= 2.33")
def test_import_engine_bounds_the_caches():
    unbounded = _probe("torch-only")
    if unbounded["growth_mb"] < 60:
        pytest.skip(f"this torch keeps {unbounded['growth_mb']:.0f} MB over 120 bf16 shapes: nothing to bound")
    bounded = _probe("engine")
    assert bounded["env"] == {k: str(CAPACITY) for k in KEYS}
    # 120 shapes x ~1.7 MB unbounded (measured 200+ MB) against a dozen-odd entries bounded (measured ~10 MB)
    assert bounded["growth_mb"] < unbounded["growth_mb"] / 4, (bounded, unbounded)


def test_a_capacity_the_user_exported_wins():
    got = _probe("engine", LRU_CACHE_CAPACITY="512", ONEDNN_PRIMITIVE_CACHE_CAPACITY="256")
    assert got["env"] == {"LRU_CACHE_CAPACITY": "512", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}
