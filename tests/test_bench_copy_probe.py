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
        answers = {k: v for k, v in r.items() if k.startswith("answers: ")}
        assert (sum(n for _, n in answers.values()) == 8) != chat  # the generator's side, corpus format only


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


def test_answer_probe_scores_greedy_answers_by_the_grader(tmp_path):
    """A scripted model that answers every task right scores 100%, one that answers a wrong list number 0%."""
    from loop.world import World
    from loop.world.corpus import corpus_documents
    from loop.world.m0 import tokenizer_texts
    from loop.world.tasks import FAMILIES, parse_task
    from loop.world.tokenizer_train import train_tokenizer
    from model.tokenizer import load_tokenizer

    fams = ("pick_labeled", "pick_missing")
    tok = load_tokenizer(train_tokenizer(tokenizer_texts(corpus_documents(0, 400, set(), families=fams),
                                                         World.judge_template_path.read_text()),
                                         tmp_path / "tokenizer.model", 512))

    class Scripted:
        def __init__(self, right: bool):
            self.right = right

        def __call__(self, ids):
            task_text = tok.decode(ids[0].tolist()).partition("\nAnswer:")[0].split("Task: ", 1)[1]
            task = parse_task(task_text, fams)
            good = {x for sol in FAMILIES[task.family].solutions(task.params) for x in sol}
            nums = [x for x, _ in task.params[0]] if task.family == "pick_labeled" else list(task.params[0])
            answer = min(good) if self.right else min(x for x in nums if x not in good)
            prompt = tok.encode(f"Task: {task_text}\nAnswer:", bos=True, eos=False)
            full = tok.encode(f"Task: {task_text}\nAnswer: {answer}", bos=True, eos=False)
            assert full[:len(prompt)] == prompt
            want = full[len(prompt):] + [tok.token_id("\n")]
            logits = torch.zeros(1, ids.shape[1], tok.vocab_size)
            logits[0, -1, want[min(ids.shape[1] - len(prompt), len(want) - 1)]] = 1.0
            return logits

    for right, acc in ((True, 100.0), (False, 0.0)):
        hits = copy_probe.probe_answers(Scripted(right), tok, 10, seed=1, families=fams)
        assert set(hits) <= {"answers: pick_labeled", "answers: pick_missing"}
        assert sum(n for _, n in hits.values()) == 10
        assert all(100.0 * h / n == acc for h, n in hits.values())
