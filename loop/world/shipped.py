"""M0s kept in the repo (loop/world/m0s/<name>/), each beside the recipe it was pretrained from.

The paper's M0 is a given pretrained model; the world's can be one too. A shipped M0 is the exact
checkpoint that m0.build_m0 pretrains for one WorldConfig: the same files, copied from that build
(pretraining on the CPU is deterministic on one CPU model: the same config and sources give the same bytes
there; another CPU model's float kernels give other bytes, bench/RESULTS.md 2026-12-08 session 2). Its
recipe.json holds the build's cache key (the config plus the sources that shape the corpus, the tokenizer
and the training step: m0.m0_cache_key), the config and the sha256 of every file. build_m0 then takes the
shipped checkpoint whose key equals the config's instead of pretraining. A source edit changes the key,
so the shipped M0 stops matching: tests/test_world_shipped.py says so until `python scripts/ship_m0.py
<name>` pretrains and ships it again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from common.atomic import atomic_write_text, replace_dir

SHIPPED_DIR = Path(__file__).resolve().parent / "m0s"
FILES = ("config.json", "model.safetensors", "tokenizer.model")  # what save_pretrained writes for the world
RECIPE = "recipe.json"


class ShippedM0Error(RuntimeError):
    """A shipped M0 whose files are not the ones its recipe names."""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recipes(root: Path = SHIPPED_DIR) -> dict[str, dict]:
    """{name: recipe} of every shipped M0 under root."""
    out = {}
    for file in sorted(Path(root).glob(f"*/{RECIPE}")):
        try:
            out[file.parent.name] = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ShippedM0Error(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    return out


def verify(folder: Path, recipe: dict) -> None:
    """Raise, naming the file, unless every file the recipe lists has its sha256."""
    for name, digest in recipe["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            raise ShippedM0Error(f"{path}: missing (listed in {Path(folder) / RECIPE})")
        got = sha256(path)
        if got != digest:
            raise ShippedM0Error(f"{path}: sha256 {got[:16]}... is not the {digest[:16]}... that "
                                 f"{Path(folder) / RECIPE} lists (ship it again: python scripts/ship_m0.py "
                                 f"{Path(folder).name})")


def find_shipped(key: str, root: Path = SHIPPED_DIR) -> Path | None:
    """The checkpoint folder of the shipped M0 pretrained under this cache key, verified; None if there is none."""
    for name, recipe in recipes(root).items():
        if recipe.get("key") == key:
            folder = Path(root) / name
            verify(folder, recipe)
            return folder
    return None


def rekey_recipe(folder: Path, recipe: dict, key: str, config: dict) -> None:
    """Rewrite folder's recipe.json under a new key and the config with today's fields (a field added since has
    its default), files unchanged; the old keys stay in "rekeyed_from"."""
    new = {**recipe, "key": key, "config": config, "rekeyed_from": [*recipe.get("rekeyed_from", []), recipe["key"]]}
    atomic_write_text(Path(folder) / RECIPE, json.dumps(new, indent=1) + "\n")
    (Path(folder) / RECIPE).chmod(0o644)


def ship(checkpoint: Path, name: str, key: str, config: dict, pretrain: dict, root: Path = SHIPPED_DIR) -> Path:
    """Copy a built M0 (checkpoint folder) to root/name with its recipe; the folder appears whole or not at all."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        for file in FILES:
            shutil.copyfile(Path(checkpoint) / file, tmp / file)
        recipe = {"key": key, "config": config, "files": {f: sha256(tmp / f) for f in FILES},
                  "pretrain": pretrain, "command": f"python scripts/ship_m0.py {name}"}
        atomic_write_text(tmp / RECIPE, json.dumps(recipe, indent=1) + "\n")
        # mkdtemp and the atomic write make owner-only files; a shipped M0 is read by whoever clones the repo
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        replace_dir(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name
