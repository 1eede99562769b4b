"""A stage's folder in the run directory: work happens in "<name>.partial", done = renamed into place.

The done marker (done.json, the stage's summary numbers) is written last inside the work folder,
then the folder is renamed atomically, so a folder without ".partial" is always complete. Every
summary counts the over-long requests the stage's generation skipped ("overlong_skipped": file -> count).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from engine.distributed import Dist, barrier

from .generation import SKIPPED_SUFFIX
from .records import write_json
from .stages import DONE, PARTIAL


class StageDir:
    def __init__(self, final: Path, dist: Dist, on_finish: Callable[[dict], None] | None = None):
        self.final = Path(final)
        self.work = self.final.with_name(self.final.name + PARTIAL)
        self.dist = dist
        self.on_finish = on_finish  # rank 0, before the rename: e.g. the summary line of metrics.jsonl

    @property
    def done(self) -> bool:
        return (self.final / DONE).exists()

    def summary(self) -> dict:
        return json.loads((self.final / DONE).read_text())

    def begin(self) -> Path:
        if self.dist.is_main:
            self.work.mkdir(parents=True, exist_ok=True)
        barrier()
        return self.work

    def finish(self, summary: dict) -> dict:
        if self.dist.is_main:
            skipped = {f.name: sum(1 for line in open(f, encoding="utf-8") if line.strip())
                       for f in sorted(self.work.glob(f"*{SKIPPED_SUFFIX}"))}
            if skipped:
                summary = {**summary, "overlong_skipped": skipped}
            if self.on_finish is not None:
                self.on_finish(summary)
            write_json(self.work / DONE, summary)
            if self.final.exists():  # a stale, incomplete folder from a forced rerun
                shutil.rmtree(self.final)
            os.replace(self.work, self.final)
        barrier()
        return summary
