"""bench/copy_probe.py on a tiny random world model: both formats run, and every review token it scores is
classified once (the copied / other numbers split matches a direct count over the same reviews)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import copy_probe  # noqa: E402


def test_probe_runs_and_counts(tmp_path):
    from loop.world import World
    from loop.world.corpus import corpus_documents
    from loop.world.m0 import tokenizer_texts
    from loop.world.tokenizer_train import train_tokenizer
    from model.checkpoint import save_pretrained
    from model.config import LlamaConfig
    from model.llama import Llama

    template = World.judge_template_path.read_text()
    tok_path = train_tokenizer(tokenizer_texts(corpus_documents(0, 400, set()), template), tmp_path / "tok" / "tokenizer.model", 512)
    config = LlamaConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=384,
                         bos_token_id=1, eos_token_id=2)
    save_pretrained(Llama(config).init_weights(0.02, torch.Generator().manual_seed(0)), tmp_path / "m",
                    tokenizer_dir=tok_path)
    reviews = copy_probe.reviews(8, seed=3)
    assert reviews == copy_probe.reviews(8, seed=3)  # fresh but reproducible
    verdicts = sum(r.count(": yes.") + r.count(": no.") for _, _, r in reviews)
    for chat in (False, True):
        r = copy_probe.probe(tmp_path / "m", chat=chat, n=8, seed=3)
        assert r["score"][1] == 8 and r["verdicts"][1] == verdicts
        assert r["'no' verdicts"][1] == sum(rv.count(": no.") for _, _, rv in reviews)
        assert r["copied numbers"][1] > 0 and all(0.0 <= acc <= 100.0 for acc, n in r.values() if n)


def test_probe_splits_looked_up_and_asked_labels(tmp_path):
    """pick_labeled's goal check "31 blue , want red": one looked-up and one asked label per goal line."""
    import re

    from loop.world import World
    from loop.world.corpus import corpus_documents
    from loop.world.m0 import tokenizer_texts
    from loop.world.tokenizer_train import train_tokenizer
    from model.checkpoint import save_pretrained
    from model.config import LlamaConfig
    from model.llama import Llama

    fams = ("pick_labeled",)
    docs = corpus_documents(0, 400, set(), families=fams)
    tok_path = train_tokenizer(tokenizer_texts(docs, World.judge_template_path.read_text()),
                               tmp_path / "tok" / "tokenizer.model", 512)
    config = LlamaConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=384,
                         bos_token_id=1, eos_token_id=2)
    save_pretrained(Llama(config).init_weights(0.02, torch.Generator().manual_seed(0)), tmp_path / "m",
                    tokenizer_dir=tok_path)
    goal_lines = sum(len(re.findall(r"\d+ (?:red|blue|green) , want (?:red|blue|green)", r))
                     for _, _, r in copy_probe.reviews(12, seed=4, families=fams))
    assert goal_lines > 0
    r = copy_probe.probe(tmp_path / "m", chat=False, n=12, seed=4, families=fams)
    assert r["looked-up labels"][1] == goal_lines and r["asked labels"][1] == goal_lines
    # the drills: every item of each fresh drill's list looked up once, each label scored once
    import random

    from loop.world.tasks import FAMILIES

    rng = random.Random("copy-probe-drills-4")
    drills = [rng.choice([FAMILIES["pick_labeled"]]).drill(rng) for _ in range(12)]
    lookups = sum(len(re.findall(r"\d+ (?:red|blue|green)", d.split("\n")[1])) for d in drills)
    assert r["drill labels"][1] == lookups > 12 and r["drill verdicts"][1] == 0
    assert "drill labels" not in copy_probe.probe(tmp_path / "m", chat=False, n=4, seed=4)  # no drills by default
