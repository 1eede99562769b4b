"""Throughput accounting: tokens/s and model FLOPs utilization (MFU) from LlamaConfig.flops_per_token.

MFU counts only real (non-padding) tokens against the dense bf16 peak of the accelerator, so padding
and recomputation show up as lost utilization, not as work. On CPU there is no meaningful peak:
MFU is None (printed "n/a") and tokens/s is the number to compare.
"""
from __future__ import annotations

import time

import torch

from model.config import LlamaConfig

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, per device name fragment (checked in order).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / NVL
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
)


def peak_flops(device: torch.device | str) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None when unknown (CPU, unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in name:
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, config: LlamaConfig, seq_len: int, peak: float | None, world_size: int = 1) -> float | None:
    """Achieved model FLOP/s over the peak of all devices; tokens_per_s is the all-rank rate."""
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * config.flops_per_token(seq_len) / (peak * world_size)


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


class Throughput:
    """Tokens since the last report, timed on the host; callers sync the device before report()."""

    def __init__(self, config: LlamaConfig, device, world_size: int = 1):
        self.config, self.world_size = config, world_size
        self.peak = peak_flops(device)
        self.tokens = 0
        self.sequences = 0
        self._t0 = time.perf_counter()

    def add(self, real_tokens: int, sequences: int) -> None:
        self.tokens += real_tokens
        self.sequences += sequences

    def report(self) -> tuple[float, float | None]:
        """(tokens/s, MFU) since the last report, all ranks (callers count all-rank tokens)."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        rate = self.tokens / dt
        seq_len = max(1, round(self.tokens / max(self.sequences, 1)))
        util = mfu(rate, self.config, seq_len, self.peak, self.world_size)
        self.tokens = self.sequences = 0
        self._t0 = now
        return rate, util
