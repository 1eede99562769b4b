"""run.seed is the one seed a user sets: it reaches the SFT/DPO data order and dropout and the world's seed
data and M0, unless a section's own seed is set; the config hash (resume fingerprint) stays stable."""
from pathlib import Path

from engine.data import epoch_batches
from loop import manifest as M
from loop.config import config_from_dict, load_config
from loop.world import World, WorldConfig

ROOT = Path(__file__).resolve().parent.parent
CPU = ROOT / "configs" / "cpu_default.yaml"


def test_run_seed_reaches_training_and_the_world():
    a, b = load_config(CPU), load_config(CPU, ["run.seed=7"])
    assert (a.sft.seed, a.dpo.seed, a.data.world["seed"]) == (0, 0, 0)
    assert (b.sft.seed, b.dpo.seed, b.data.world["seed"]) == (7, 7, 7)
    assert a.hash() != b.hash()
    # what those seeds drive: the world's seed data (and so M0, keyed by the world config) and the data order
    wa, wb = WorldConfig.from_dict(a.data.world), WorldConfig.from_dict(b.data.world)
    assert wa != wb
    small = dict(n_ift=8, n_eft_train=2, n_eft_eval=1, n_eval_prompts=2)
    ift_a = World(WorldConfig.from_dict({**a.data.world, **small})).seed_records()["ift"]
    ift_b = World(WorldConfig.from_dict({**b.data.world, **small})).seed_records()["ift"]
    assert [r["prompt"] for r in ift_a] != [r["prompt"] for r in ift_b]
    lengths = list(range(64))
    assert epoch_batches(lengths, 8, a.sft.seed, 0) != epoch_batches(lengths, 8, b.sft.seed, 0)


def test_a_sections_own_seed_wins(tmp_path):
    c = load_config(CPU, ["run.seed=7", "sft.seed=3", "data.world.seed=11"])
    assert (c.sft.seed, c.dpo.seed, c.data.world["seed"]) == (3, 7, 11)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("run: {seed: 5}\ndpo: {seed: 2}\n")
    d = load_config(yaml)
    assert (d.sft.seed, d.dpo.seed, d.data.world["seed"]) == (5, 2, 5)
    assert load_config(yaml, ["dpo.seed=5"]).hash() != d.hash()


def test_oasst_runs_get_no_world_seed(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    c = load_config(None, ["run.seed=4", "data.source=oasst", f"data.oasst_path={tmp_path / 'x.jsonl'}",
                           f"model.init={ckpt}"])
    assert c.data.world == {} and (c.sft.seed, c.dpo.seed) == (4, 4)


def test_resume_fingerprint_is_stable(tmp_path):
    args = ["run.seed=7", "sft.seed=3"]
    cfg = load_config(CPU, args)
    assert load_config(CPU, args).hash() == cfg.hash()
    assert config_from_dict(cfg.to_dict()).hash() == cfg.hash()  # the manifest's config reloads to the same
    M.open_run(tmp_path / "run", cfg, resume=False, force_config=False)
    M.open_run(tmp_path / "run", load_config(CPU, args), resume=True, force_config=False)  # no ManifestError
