"""The registry of task families: one module per kind, each Family subclass rendering, parsing, solving and
checking its instructions (base.py holds the interface).

A world M0's recipe key (loop/world/m0.py `m0_sources`) hashes base.py and the modules of the families its config
names, not this registry and not the other modules: adding a family in a module of its own leaves every
shipped M0 valid. New families go last, so `parse_task` over all of them still reads existing text as before.
"""
from __future__ import annotations

from .arithmetic import ParityBetween, PickCompared, PickPair, SumDigits
from .base import Family
from .lookup import LABELS, PickLabeled, PickMissing

FAMILIES: dict[str, Family] = {f.name: f for f in (SumDigits(), PickPair(), ParityBetween(), PickCompared(),
                                                   PickLabeled(), PickMissing())}
# The families of the default world (WorldConfig.families); the others are options.
DEFAULT_FAMILIES = ("sum_digits", "pick_pair", "parity_between", "pick_compared")

__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "LABELS", "Family"]
