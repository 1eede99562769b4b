"""`loop/iterate.py --help` lists every config key with its default and a one-line meaning, all read
from the config dataclasses (their defaults and the comments in their source)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import TrainConfig
from loop.config import LoopConfig, RunConfig, load_config
from loop.config_help import config_keys, field_meanings, help_text

ROOT = Path(__file__).resolve().parent.parent


def leaf_keys(obj, prefix=""):
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out += leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


def test_every_key_has_its_default_and_a_meaning():
    keys = config_keys()
    assert [k for k, _, _ in keys] == leaf_keys(LoopConfig())
    missing = [k for k, _, meaning in keys if not meaning.strip()]
    assert not missing, f"config fields without a comment (add one in the dataclass): {missing}"
    by_key = {k: (d, m) for k, d, m in keys}
    # the defaults are LoopConfig()'s: the sft and dpo sections differ (the paper's two stages)
    assert by_key["sft.lr"][0] == 5.5e-6 and by_key["dpo.lr"][0] == 1e-6
    assert by_key["run.log_to"][0] == ("jsonl",)
    # a trailing comment wins over a section header above the field; a leading block gives its first sentence
    assert by_key["dpo.objective.beta"][1].startswith("DPO: strength of the KL anchor")
    assert by_key["sft.param_persistence_threshold"][1] == (
        "ZeRO-3 keeps params below this many elements whole on every rank.")
    assert field_meanings(RunConfig)["iterations"] == "AIFT iterations: M1 -> M2 -> M3 is 2"
    assert set(field_meanings(TrainConfig)) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_help_lists_each_key_once_with_a_default_that_parses_back():
    text = help_text()
    for key, default, meaning in config_keys():
        hits = [line for line in text.splitlines() if line.strip().startswith(f"{key}=")]
        assert len(hits) == 1, key
        shown = hits[0].strip().split("  ")[0].split("=", 1)[1]
        assert json.loads(shown) == (list(default) if isinstance(default, tuple) else default), key
        assert meaning in text
    # what --help shows is what the config loader takes back
    cfg = load_config(None, ["prompts.banned_keywords=" + json.dumps(["x", "y"]), "run.log_to=[jsonl, tensorboard]"])
    assert cfg.prompts.banned_keywords == ("x", "y") and cfg.run.log_to == ("jsonl", "tensorboard")


def test_iterate_help_prints_the_key_list():
    out = subprocess.run([sys.executable, "loop/iterate.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--resume" in out.stdout and help_text() in out.stdout


@pytest.mark.parametrize("value", ["[mlflow]", "[jsonl, tb]"])
def test_unknown_logger_is_a_config_error_naming_the_key(value):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run\.log_to has '(mlflow|tb)': unknown"):
        load_config(None, [f"run.log_to={value}"])


def test_log_to_is_not_part_of_the_config_hash():
    a, b = load_config(None, []), load_config(None, ["run.log_to=[tensorboard, wandb]"])
    assert a.hash() == b.hash() and a.run.log_to != b.run.log_to
