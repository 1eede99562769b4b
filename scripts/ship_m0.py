"""Pretrain a world M0 and ship it in the repo (loop/world/m0s/<name>/), or check that a shipped one reproduces.

    python scripts/ship_m0.py default                 # the default world's M0 (WorldConfig()), ~3.5 min on 2 cores
    python scripts/ship_m0.py lookup --world "{families: [pick_labeled, pick_missing], pretrain_steps: 12000}"
    python scripts/ship_m0.py lookup                  # again, from the config in its recipe.json (after a source edit)
    python scripts/ship_m0.py default --check         # pretrain again; exit 1 unless every file has the shipped bytes
    python scripts/ship_m0.py NAME --from-cache .cache/world   # ship the build cached under this recipe's key
    python scripts/ship_m0.py NAME --rekey            # same files under today's key, after an edit that builds the same

`--rekey` is for source edits that change the recipe key but not what it builds (a refactor, a family added in
a module of its own). It rebuilds the corpus and tokenizer (minutes, no pretraining) and refuses unless the
tokenizer has the shipped bytes; the training step itself it cannot check, so prove that first (the old tree and
the new one pretrain the same bytes on one machine: CPU builds differ between CPU models, bench/RESULTS.md
2026-12-08 session 2). The recipe keeps the keys it was shipped under ("rekeyed_from").

`--world` takes WorldConfig fields as YAML (loop/world/config.py), as `data.world` does in a loop config.
Pretraining runs in a temporary folder, never the loop's cache; the shipped folder appears whole or not at all.
The default world's M0 must be shipped: tests/test_world_shipped.py fails when it is missing or stale.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.errors import ConfigError  # noqa: E402
from loop.world import World, WorldConfig  # noqa: E402
from loop.world.m0 import m0_cache_key  # noqa: E402
from loop.world.shipped import FILES, SHIPPED_DIR, recipes, sha256, ship  # noqa: E402

DEFAULT = "default"


def world_config(name: str, world: str | None, root: Path) -> WorldConfig:
    """--world if given, else the config NAME was shipped with, else WorldConfig() for `default`."""
    if world is not None:
        try:
            fields = yaml.safe_load(world) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"ship_m0: --world is not YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(fields, dict):
            raise SystemExit(f"ship_m0: --world must be a mapping of WorldConfig fields, got {world!r}")
    elif (recipe := recipes(root).get(name)) is not None:
        fields = recipe["config"]
    elif name == DEFAULT:
        fields = {}
    else:
        raise SystemExit(f"ship_m0: no shipped M0 named {name!r} under {root}: give its config with --world")
    try:
        return WorldConfig.from_dict(fields)
    except ConfigError as e:
        raise SystemExit(f"ship_m0: --world: {e}") from None


def pretrain_summary(build_root: Path) -> dict:
    """What recipe.json keeps of the build's pretrain_log.json: sizes, time and the last logged loss."""
    log = json.loads((build_root / "pretrain_log.json").read_text())
    last = log["history"][-1] if log["history"] else {}
    return {"params": log["params"], "corpus_rows": log["corpus_rows"], "corpus_tokens": log["corpus_tokens"],
            "wall_s": log["wall_s"], "final_loss": last.get("loss")}


def rekey(name: str, cfg: WorldConfig, key: str, root: Path) -> int:
    """Record today's key in NAME's recipe, files unchanged, once the rebuilt tokenizer has the shipped bytes."""
    from loop.world.m0 import corpus_and_tokenizer
    from loop.world.shipped import rekey_recipe, verify

    recipe = recipes(root).get(name)
    if recipe is None:
        raise SystemExit(f"ship_m0: --rekey: no shipped M0 named {name!r} under {root}")
    verify(root / name, recipe)
    if recipe["key"] == key:
        print(f"ship_m0: {name}: already shipped under today's key {key}")
        return 0
    world = World(cfg)
    with tempfile.TemporaryDirectory(prefix="ship_m0.") as tmp:
        _, tok = corpus_and_tokenizer(cfg, Path(tmp), world.seed_instructions(),
                                      world.judge_template_path.read_text(encoding="utf-8"))
        if sha256(tok) != recipe["files"]["tokenizer.model"]:
            print(f"ship_m0: {name}: today's sources build another corpus or tokenizer: not rekeyed "
                  f"(ship it again: python scripts/ship_m0.py {name})")
            return 1
    rekey_recipe(root / name, recipe, key, cfg.to_dict())
    print(f"ship_m0: {name}: rekeyed {recipe['key']} -> {key} (tokenizer rebuilt bit for bit; files unchanged)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="folder under the shipped root; `default` is the default world's M0")
    ap.add_argument("--world", help="WorldConfig fields as YAML (default: NAME's recipe, or the default world)")
    ap.add_argument("--check", action="store_true", help="pretrain again and compare with the shipped files")
    ap.add_argument("--from-cache", type=Path, help="a world cache dir holding this recipe's build: no pretraining")
    ap.add_argument("--rekey", action="store_true", help="keep the shipped files, record today's key (no pretraining)")
    ap.add_argument("--root", type=Path, default=SHIPPED_DIR, help="where shipped M0s live (default: %(default)s)")
    args = ap.parse_args(argv)
    if sum((args.check, args.from_cache is not None, args.rekey)) > 1:
        ap.error("--check, --from-cache and --rekey exclude each other")
    if args.rekey and args.world is not None:
        ap.error("--rekey keeps the shipped recipe's config; it does not take --world")
    cfg = world_config(args.name, args.world, args.root)
    key = m0_cache_key(cfg)
    if args.rekey:
        return rekey(args.name, cfg, key, args.root)
    with tempfile.TemporaryDirectory(prefix="ship_m0.") as tmp:
        if args.from_cache:
            build = args.from_cache / f"m0-{key}"
            if not (build / "checkpoint" / "config.json").is_file():
                raise SystemExit(f"ship_m0: {build}: no cached build of this recipe (key {key})")
        else:
            World(cfg).build_m0(tmp, use_shipped=False)
            build = Path(tmp) / f"m0-{key}"
        if args.check:
            shipped = recipes(args.root).get(args.name)
            if shipped is None:
                raise SystemExit(f"ship_m0: --check: no shipped M0 named {args.name!r} under {args.root}")
            if shipped["key"] != key:
                print(f"ship_m0: {args.name}: shipped under key {shipped['key']}, this recipe is {key} (stale)")
                return 1
            differ = [f for f in FILES if sha256(build / "checkpoint" / f) != shipped["files"][f]]
            print(f"ship_m0: {args.name}: " + (f"{', '.join(differ)} differ" if differ else
                                               f"all {len(FILES)} files reproduce bit for bit (key {key})"))
            return 1 if differ else 0
        folder = ship(build / "checkpoint", args.name, key, cfg.to_dict(), pretrain_summary(build), args.root)
    print(f"ship_m0: shipped {folder} (key {key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
