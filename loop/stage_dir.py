"""A stage's folder in the run directory: work happens in "<name>.partial", done = renamed into place.

The done marker (done.json, the stage's summary numbers) is written last inside the work folder,
then the folder is renamed atomically, so a folder without ".partial" is always complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engine.distributed import Dist, barrier

from .records import write_json

DONE = "done.json"


class StageDir:
    def __init__(self, final: Path, dist: Dist):
        self.final = Path(final)
        self.work = self.final.with_name(self.final.name + ".partial")
        self.dist = dist

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
            write_json(self.work / DONE, summary)
            if self.final.exists():  # a stale, incomplete folder from a forced rerun
                shutil.rmtree(self.final)
            os.replace(self.work, self.final)
        barrier()
        return summary
