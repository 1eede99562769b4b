"""A run's metrics: RUN_DIR/metrics.jsonl always; TensorBoard and Weights & Biases when asked.

metrics.jsonl holds one line per optimizer step, {"stage": "sft/M1", "step": k, "loss": ..., ...},
and one {"stage": ..., "summary": {...}} line per finished stage. A stage is rewritten, never doubled:
begin(stage, from_step) drops that stage's step lines past from_step (the checkpoint a resumed stage
continues from; 0 = a fresh start) and its summary, and a summary replaces the stage's earlier one.
So after any kill and resume the file holds each step once, with the values of the run that finished.
A line torn by a kill is dropped at the next rewrite. Rewrites are atomic (temp file + rename).

TensorBoard: one event directory per stage, RUN_DIR/tensorboard/<stage>, so a resumed stage purges
its own events past the checkpoint (SummaryWriter's purge_step) without touching other stages.
W&B: one run per run directory (its id kept in RUN_DIR/wandb_run_id, so a resumed run continues it),
each stage's keys charted against that stage's own step; W&B's history is append-only, so the steps
a resume redoes appear twice there. WANDB_MODE=offline (and WANDB_DIR, WANDB_PROJECT) are honoured.

Only rank 0 may hold a sink: the sinks open lazily (on the first record), so a sink that is never
written to creates nothing, and the trainer writes on rank 0 only.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import shutil
from pathlib import Path

from common.atomic import atomic_write_text

from common.errors import ConfigError

SINKS = ("jsonl", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class MetricsLogError(ConfigError):
    """A sink that cannot run (unknown name, package missing); one line naming run.log_to."""


def check_sinks(log_to) -> tuple[str, ...]:
    """The sink names, validated, their packages importable; jsonl is always on.
    Raises MetricsLogError naming run.log_to."""
    names = tuple(log_to)
    for name in names:
        if name not in SINKS:
            raise MetricsLogError(f"run.log_to: {name!r} is not a logger (known: {', '.join(SINKS)})")
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None:
            raise MetricsLogError(f"run.log_to: {name} needs the {_PACKAGES[name]} package "
                                  "(pip install -e '.[log]')")
    return ("jsonl",) + tuple(n for n in dict.fromkeys(names) if n != "jsonl")


def _clean(value):
    """JSON-safe: non-finite floats become null, tuples lists, anything else unknown its str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def read_metrics(path: str | Path) -> list[dict]:
    """The complete lines of a metrics.jsonl (a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsSink:
    def __init__(self, run_dir: str | Path, log_to=("jsonl",), *, config: dict | None = None,
                 run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.log_to = check_sinks(log_to)
        self.path = self.run_dir / METRICS_FILE
        self.config = config
        self.run_name = run_name or self.run_dir.name
        self._writers: dict = {}
        self._purge: dict[str, int] = {}
        self._wandb = None
        self._wandb_stages: set[str] = set()

    def stage(self, name: str) -> "StageMetrics":
        return StageMetrics(self, name)

    # --- the three operations ---------------------------------------------------------------
    def begin(self, stage: str, from_step: int = 0) -> None:
        """`stage` (re)starts after step from_step: its later step lines and its summary go."""
        self._rewrite(lambda r: r.get("stage") != stage or ("step" in r and r["step"] <= from_step))
        if "tensorboard" in self.log_to:
            self._close_writer(stage)
            if from_step == 0:
                shutil.rmtree(self._tb_dir(stage), ignore_errors=True)
            else:
                self._purge[stage] = from_step + 1

    def log_step(self, stage: str, record: dict) -> None:
        record = _clean({"stage": stage, **record})
        self._append(record)
        scalars = _scalars(record)
        if "tensorboard" in self.log_to:
            writer = self._writer(stage)
            for key, value in scalars.items():
                writer.add_scalar(key, value, record["step"])
            writer.flush()
        if "wandb" in self.log_to:
            run = self._wandb_run()
            if stage not in self._wandb_stages:
                run.define_metric(f"{stage}/step")
                run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self._wandb_stages.add(stage)
            run.log({f"{stage}/step": record["step"], **{f"{stage}/{k}": v for k, v in scalars.items()}})

    def log_summary(self, stage: str, summary: dict) -> None:
        summary = _clean(summary)
        line = {"stage": stage, "summary": summary}
        if any(r.get("stage") == stage and "summary" in r for r in read_metrics(self.path)):
            self._rewrite(lambda r: not (r.get("stage") == stage and "summary" in r))
        self._append(line)
        if "tensorboard" in self.log_to and (stage in self._writers or self._tb_dir(stage).is_dir()):
            writer = self._writer(stage)
            writer.add_text("summary", json.dumps(summary, indent=1))
            self._close_writer(stage)
        if "wandb" in self.log_to:
            self._wandb_run().summary[f"{stage}/summary"] = summary

    def close(self) -> None:
        for stage in list(self._writers):
            self._close_writer(stage)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    # --- jsonl --------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")

    def _rewrite(self, keep) -> None:
        if not self.path.is_file():
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if keep(r)))

    # --- tensorboard --------------------------------------------------------------------------
    def _tb_dir(self, stage: str) -> Path:
        return self.run_dir / TB_DIR / stage

    def _writer(self, stage: str):
        if stage not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[stage] = SummaryWriter(str(self._tb_dir(stage)), purge_step=self._purge.pop(stage, None))
        return self._writers[stage]

    def _close_writer(self, stage: str) -> None:
        writer = self._writers.pop(stage, None)
        if writer is not None:
            writer.close()

    # --- wandb --------------------------------------------------------------------------------
    def _wandb_run(self):
        if self._wandb is None:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            if not id_file.is_file():
                atomic_write_text(id_file, run_id)
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "self-rewarding"), id=run_id,
                                     resume="allow", name=self.run_name, config=self.config,
                                     dir=os.environ.get("WANDB_DIR", str(self.run_dir)))
        return self._wandb


class StageMetrics:
    """One stage's view of a MetricsSink: what the engine's trainer is handed (it never sees the loop)."""

    def __init__(self, sink: MetricsSink, name: str):
        self.sink, self.name = sink, name

    def begin(self, from_step: int = 0) -> None:
        self.sink.begin(self.name, from_step)

    def step(self, record: dict) -> None:
        self.sink.log_step(self.name, record)

    def summary(self, summary: dict) -> None:
        self.sink.log_summary(self.name, summary)
