"""The run directory's manifest.json: which config, code and seed produced the artifacts in it.

A run directory belongs to one config. Resuming with a different config (different hash) would mix
artifacts made under two settings, so it is refused unless the caller forces it; a forced change is
recorded in the manifest's history.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from .config import LoopConfig
from .records import write_json

MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    """The run directory cannot be (re)used with this config; the message says why and what to pass."""


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_run(run_dir: Path, cfg: LoopConfig, *, resume: bool, force_config: bool) -> dict:
    """Create or check the manifest; returns it. Call on rank 0 only."""
    path = run_dir / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if not resume:
            raise ManifestError(f"{run_dir} already holds a run; pass --resume to continue it (or use another --run-dir)")
        if manifest["config_hash"] != cfg.hash():
            changed = _diff(manifest["config"], cfg.to_dict())
            if not force_config:
                state = "finished" if manifest.get("finished") else "started"
                raise ManifestError(f"{path}: the config differs from the one this {state} run used "
                                    f"({'; '.join(changed[:5])}); pass --force-config to continue anyway")
            manifest.setdefault("history", []).append(
                {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "forced_config_change": changed,
                 "old_hash": manifest["config_hash"]})
            manifest.update(config=cfg.to_dict(), config_hash=cfg.hash(), finished=False)
        manifest.setdefault("resumed", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code_version()})
    else:
        manifest = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "code_version": code_version(),
                    "seed": cfg.run.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": False}
    write_json(path, manifest)
    return manifest


def mark_finished(run_dir: Path, manifest: dict, wall_s: float) -> None:
    manifest["finished"] = True
    manifest["wall_s"] = wall_s
    write_json(run_dir / MANIFEST, manifest)


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            if prefix == "" and k == "run":
                o, n = dict(old.get(k, {})), dict(new.get(k, {}))
                o.pop("run_dir", None), n.pop("run_dir", None)
                out += _diff(o, n, "run.")
            else:
                out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
