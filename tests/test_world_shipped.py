"""loop/world/shipped.py and scripts/ship_m0.py: shipped M0s match their recipes; the default world has one;
build_m0 takes a shipped M0 of the same recipe instead of pretraining, and refuses a corrupted one."""
from __future__ import annotations

import json

import pytest

from loop.world import World, WorldConfig
from loop.world.m0 import m0_cache_key
from loop.world.shipped import FILES, SHIPPED_DIR, ShippedM0Error, find_shipped, recipes, sha256
from scripts.ship_m0 import main as ship_main

TINY = {"n_ift": 20, "n_eft_train": 5, "n_eft_eval": 5, "n_eval_prompts": 5, "corpus_docs": 300, "pretrain_steps": 3,
        "pretrain_batch": 2, "pretrain_seq_len": 64, "tokenizer_vocab_size": 512,
        "model_overrides": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "max_seq_len": 128}}


def test_every_shipped_m0_matches_its_recipe():
    shipped = recipes()
    assert shipped, f"no shipped M0 under {SHIPPED_DIR}"
    for name, recipe in shipped.items():
        key = m0_cache_key(WorldConfig.from_dict(recipe["config"]))
        assert key == recipe["key"], (
            f"{SHIPPED_DIR / name}: shipped under recipe key {recipe['key']}, but today's sources and its config give "
            f"{key}: a source that shapes M0 changed. Ship it again: python scripts/ship_m0.py {name}")
        assert set(recipe["files"]) == set(FILES)
        assert find_shipped(key) == SHIPPED_DIR / name  # verifies every sha256


def test_the_lookup_config_finds_the_shipped_lookup_m0():
    # configs/cpu_lookup.yaml's world is the shipped lookup M0's recipe: a run loads it instead of a 54-min pretrain
    from pathlib import Path

    from loop.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "cpu_lookup.yaml")
    key = m0_cache_key(WorldConfig.from_dict(cfg.data.world))
    assert find_shipped(key) == SHIPPED_DIR / "lookup"


def test_the_default_world_loads_its_shipped_m0_without_pretraining(tmp_path, monkeypatch):
    import loop.world.m0 as m0

    monkeypatch.setattr(m0, "pretrain", lambda *a, **k: pytest.fail("the default world pretrained M0"))
    logs = []
    ckpt, tok = World(WorldConfig()).build_m0(tmp_path, log=logs.append)
    assert ckpt == SHIPPED_DIR / "default" and tok == ckpt / "tokenizer.model"
    assert not list(tmp_path.iterdir()) and "shipped" in logs[0]


def test_ship_check_and_load_a_tiny_m0(tmp_path, monkeypatch, capsys):
    import loop.world.m0 as m0
    import loop.world.shipped as shipped

    root, world = tmp_path / "m0s", json.dumps(TINY)
    assert ship_main(["tiny", "--world", world, "--root", str(root)]) == 0
    recipe = recipes(root)["tiny"]
    cfg = WorldConfig.from_dict(TINY)
    assert recipe["key"] == m0_cache_key(cfg) and WorldConfig.from_dict(recipe["config"]) == cfg
    assert all(sha256(root / "tiny" / f) == recipe["files"][f] for f in FILES)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left beside it
    assert all((root / "tiny" / f).stat().st_mode & 0o044 == 0o044 for f in (*FILES, "recipe.json"))  # readable by all
    # pretraining is deterministic: a second build, from the recipe alone, has the same bytes
    assert ship_main(["tiny", "--check", "--root", str(root)]) == 0
    assert "bit for bit" in capsys.readouterr().out

    monkeypatch.setattr(shipped, "SHIPPED_DIR", root)
    monkeypatch.setattr(m0, "find_shipped", lambda key: shipped.find_shipped(key, root))
    monkeypatch.setattr(m0, "pretrain", lambda *a, **k: pytest.fail("pretrained despite a shipped M0"))
    ckpt, _ = World(cfg).build_m0(tmp_path / "cache", log=None)
    assert ckpt == root / "tiny"

    weights = root / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ShippedM0Error, match=r"model\.safetensors: sha256 .*ship_m0\.py tiny"):
        World(cfg).build_m0(tmp_path / "cache", log=None)


def test_ship_refuses_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="no shipped M0 named 'other'"):
        ship_main(["other", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown key"):
        ship_main(["x", "--world", "{no_such_field: 1}", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="not YAML"):
        ship_main(["x", "--world", "{a: [", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="no cached build"):
        ship_main(["x", "--world", json.dumps(TINY), "--from-cache", str(tmp_path), "--root", str(tmp_path)])


def test_rekey_keeps_the_files_and_refuses_another_corpus(tmp_path, capsys):
    root, world = tmp_path / "m0s", json.dumps(TINY)
    assert ship_main(["tiny", "--world", world, "--root", str(root)]) == 0
    shipped = recipes(root)["tiny"]
    key = shipped["key"]
    # an edit that changes the key but not the build: the recipe still names the old key
    (root / "tiny" / "recipe.json").write_text(json.dumps({**shipped, "key": "0" * 16}))
    assert ship_main(["tiny", "--rekey", "--root", str(root)]) == 0
    rekeyed = recipes(root)["tiny"]
    assert rekeyed["key"] == key and rekeyed["rekeyed_from"] == ["0" * 16] and rekeyed["files"] == shipped["files"]
    assert find_shipped(key, root) == root / "tiny"
    assert ship_main(["tiny", "--rekey", "--root", str(root)]) == 0 and "already" in capsys.readouterr().out
    # a recipe whose corpus is another one (here: fewer documents) builds another tokenizer: refused, unchanged
    other = {**rekeyed, "config": {**rekeyed["config"], "corpus_docs": 120}}
    (root / "tiny" / "recipe.json").write_text(json.dumps(other))
    assert ship_main(["tiny", "--rekey", "--root", str(root)]) == 1
    assert "not rekeyed" in capsys.readouterr().out and recipes(root)["tiny"] == other
    for bad in (["--rekey", "--check"], ["--rekey", "--world", "{}"]):
        with pytest.raises(SystemExit):
            ship_main(["tiny", *bad, "--root", str(root)])


def test_a_family_module_shapes_only_the_m0s_of_its_families():
    """m0_sources: the common files, then the family modules a config names; adding a family in a module of its
    own (or editing one) leaves every other world's key, and so its shipped M0, as it is."""
    from loop.world.m0 import FAMILIES_DIR, m0_sources

    default = m0_sources(WorldConfig())
    lookup = m0_sources(WorldConfig(families=["pick_labeled", "pick_missing"]))
    assert FAMILIES_DIR / "arithmetic.py" in default and FAMILIES_DIR / "lookup.py" not in default
    assert FAMILIES_DIR / "lookup.py" in lookup and FAMILIES_DIR / "arithmetic.py" not in lookup
    common = [p for p in default if p.parent != FAMILIES_DIR or p.name == "base.py"]
    assert common == [p for p in lookup if p.parent != FAMILIES_DIR or p.name == "base.py"]
    assert {p.name for p in common} >= {"tasks.py", "base.py", "corpus.py", "seed.py", "m0.py", "optim.py"}
    assert m0_sources(WorldConfig(families=["pick_missing", "sum_digits"])) == \
        m0_sources(WorldConfig(families=["sum_digits", "pick_missing"]))  # the key's file order is fixed


def test_the_key_names_the_class_each_family_maps_to(monkeypatch):
    """The registry is not hashed; a name mapped to another class (same modules) still changes the key."""
    from loop.world.families import FAMILIES
    from loop.world.families.lookup import PickMissing

    cfg = WorldConfig(families=["pick_labeled", "pick_missing"])
    key = m0_cache_key(cfg)

    class Renamed(PickMissing):
        pass

    monkeypatch.setitem(FAMILIES, "pick_missing", Renamed())
    assert m0_cache_key(cfg) != key
