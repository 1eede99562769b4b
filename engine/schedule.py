"""Learning-rate schedule: linear warmup, then cosine decay from the peak to a floor (as the paper).

CosineSchedule sets the lr of every param group directly, so it works the same on a torch optimizer
and under DeepSpeed (which steps it at gradient-accumulation boundaries and checkpoints its state).
"""
from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, peak: float, floor: float, warmup_steps: int = 0) -> float:
    """The lr for optimizer step `step` (0-based): warmup to peak, then cosine to floor at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineSchedule:
    """Scheduler object with the torch LRScheduler surface DeepSpeed uses: step, state_dict, get_last_lr."""

    def __init__(self, optimizer, total_steps: int, peak: float, floor: float, warmup_steps: int = 0):
        self.optimizer = optimizer
        self.total_steps, self.peak, self.floor, self.warmup_steps = total_steps, peak, floor, warmup_steps
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        lr = cosine_lr(self.last_step, self.total_steps, self.peak, self.floor, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def step(self, *_args, **_kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "peak": self.peak,
                "floor": self.floor, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
