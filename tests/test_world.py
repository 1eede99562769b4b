"""The embedded default world: task checkers, grader, seed data, prompt filter, tokenizer and M0 cache."""
import json
import random
import re

import pytest

from loop.judge import load_template, parse_score
from loop.world import World, WorldConfig, grader_unavailable
from loop.world.grader import GraderUnavailable, grade
from loop.world.tasks import FAMILIES, parse_task, run_checks, sample_task
from common.errors import ConfigError

# A hand-written correct and a hand-written wrong answer (with the score the grader must give) per family.
CASES = [
    ("Give three digits that sum to 14.", "5 9 0", [("5 9 1", 3), ("12 2 0", 2), ("5 9", 1), ("5, 9, 0", 4)]),
    ("List two digits with a sum of 7.", "3 4", [("3 5", 3), ("10 -3", 2), ("7", 1), ("The answer is 3 4.", 4)]),
    ("Pick two numbers from 3 8 5 1 that sum to 9.", "8 1", [("5 3", 3), ("7 2", 2), ("4 4", 2), ("8 1 0", 1)]),
    ("Which two numbers in 2 6 9 4 add up to 13?", "9 4", [("9 2", 3), ("6 7", 2), ("9 4.", 4)]),
    ("Name an even number between 12 and 30.", "18", [("17", 3), ("12", 2), ("30", 2), ("32", 2), ("18 20", 1)]),
    ("Give an odd number greater than 40 and less than 44.", "41", [("42", 3), ("39", 2), ("I do not know.", 0)]),
    ("Name a number from 14 37 22 9 that is bigger than 20.", "37", [("14", 3), ("38", 2), ("37 22", 1)]),
    ("Which number in 14 37 22 9 is smaller than 20?", "9", [("22", 3), ("19", 2), ("Sure , 9", 4)]),
    ("From 12 red , 31 blue , 7 red , 25 green , name a blue number.", "31",
     [("12", 3), ("25", 3), ("32", 2), ("31 12", 1), ("The answer is 31.", 4)]),
    ("Pick a green number from 40 green , 18 red , 33 blue , 19 blue , 56 green.", "56",
     [("18", 3), ("41", 2), ("Yes.", 0)]),
    ("Name a number from 12 31 7 25 that is not in 7 40 12 33.", "25", [("12", 3), ("40", 2), ("33", 2), ("25 31", 1)]),
    ("Which number in 49 55 19 56 is missing from 49 59 51 19?", "55", [("19", 3), ("59", 2), ("55.", 4)]),
]


@pytest.mark.parametrize("instruction,right,wrongs", CASES)
def test_checkers_agree_with_constructed_answers(instruction, right, wrongs):
    g = grade(instruction, right)
    assert (g.score, g.correct) == (5.0, True), g.justification
    for response, expected in wrongs:
        g = grade(instruction, response)
        assert g.score == expected and not g.correct, (response, g.justification)


def test_every_family_solution_scores_five_and_checks_are_nested():
    rng = random.Random(1)
    for _ in range(300):
        task = sample_task(rng, tuple(FAMILIES))
        sols = FAMILIES[task.family].solutions(task.params)
        assert sols, task.text
        assert parse_task(task.text) == task
        for sol in rng.sample(sols, min(3, len(sols))):
            assert grade(task.text, " ".join(map(str, sol))).score == 5
        checks = run_checks(task, "1 2 3 4 5 6")
        # Only the last check run can fail: the score is the count of passes before the first failure.
        assert all(c.passed for c in checks[:-1])


def test_justification_spells_the_check_and_parses():
    g = grade("Give three digits that sum to 14.", "5 9 1")
    assert "5 + 9 + 1 = 15 , target 14: no." in g.justification
    assert g.justification.endswith("Score: 3")
    assert parse_score(g.justification) == 3.0
    rng = random.Random(2)
    for _ in range(100):
        task = sample_task(rng)
        for response in ("", "7", "3 4", "Yes.", "10 20 30"):
            g = grade(task.text, response)
            assert re.search(r"Score: [0-5]$", g.justification)
            assert parse_score(g.justification) == g.score


def test_grade_rejects_foreign_instruction():
    with pytest.raises(ValueError, match="not an instruction of this world"):
        grade("Write a poem about the sea.", "5")


def test_grader_can_be_made_unavailable():
    world = World(WorldConfig())
    with grader_unavailable():
        with pytest.raises(GraderUnavailable):
            world.grade("Give three digits that sum to 14.", "5 9 0")
        assert world.is_valid_prompt("Give three digits that sum to 14.")  # the prompt filter needs no grader
    assert world.grade("Give three digits that sum to 14.", "5 9 0").score == 5


def test_is_valid_prompt_accepts_phrasings_and_rejects_junk():
    rng = random.Random(3)
    for _ in range(300):
        assert World().is_valid_prompt(sample_task(rng).text)
    assert World().is_valid_prompt("  give THREE digits   that sum to 14. ")
    for junk in ("", "Give three digits that sum to", "Give four digits that sum to 14.", "hello world",
                 "Give three digits that sum to 40.",  # no three digits sum to 40
                 "Pick two numbers from 3 8 5 1 that sum to 17.",  # no such pair
                 "Name an even number between 12 and 13.",  # nothing between
                 "Name a number from 14 37 22 9 that is bigger than 90.",
                 "Give three digits that sum to 14. Give three digits that sum to 14.",
                 "Give three digits that sum to 14.\nAnswer: 5 9 0", "x" * 500):
        assert not World().is_valid_prompt(junk), junk


def test_lookup_checks_read_the_label_and_the_second_list():
    """The lookup families' goal check spells what the judge must read off the instruction."""
    g = grade("From 12 red , 31 blue , 7 red , 25 green , name a red number.", "31")
    assert "31 in list: yes. 31 blue , want red: no. Score: 3" in g.justification
    g = grade("Name a number from 12 31 7 25 that is not in 7 40 12 33.", "31")
    assert "31 in first list: yes. 31 not in second list: yes." in g.justification


def test_world_families_choose_the_tasks_and_the_prompt_filter():
    world = World(WorldConfig(n_ift=40, n_eft_train=5, n_eft_eval=5, n_eval_prompts=10,
                              families=["pick_labeled", "pick_missing"]))  # a YAML list works
    assert world.cfg.families == ("pick_labeled", "pick_missing")
    families = {parse_task(r["prompt"]).family for split in world.seed_records().values() for r in split}
    assert families == {"pick_labeled", "pick_missing"}
    assert world.is_valid_prompt("Which number in 49 55 19 56 is missing from 49 59 51 19?")
    assert not world.is_valid_prompt("Give three digits that sum to 14.")  # a family this world does not have
    assert {parse_task(p["prompt"]).family for p in world.validation_prompts(20)} <= set(world.cfg.families)
    from loop.world.corpus import corpus_documents

    docs = corpus_documents(0, 200, set(), families=world.cfg.families)
    assert not any("digits" in d for d in docs) and any(" is missing from " in d or " not in " in d for d in docs)
    for bad in ("pick_labeled", [], ["nope"], ["pick_pair", "pick_pair"]):
        with pytest.raises(ConfigError, match="families"):
            WorldConfig(families=bad)


def test_lookup_drills_state_the_graders_checks(tmp_path):
    """CorpusMix.lookups: each drill line is how the grader's goal check of that item starts (pick_labeled)
    or the check itself with its verdict (pick_missing)."""
    from loop.world.corpus import CorpusMix, corpus_documents
    from loop.world.grader import justification_for
    from loop.world.tasks import LABELS, Task

    fams = ("pick_labeled", "pick_missing")
    docs = corpus_documents(1, 300, set(), CorpusMix(lookups=0.5), families=fams)
    drills = [d for d in docs if d.startswith(("List: ", "First list: "))]
    assert 0.25 < len(drills) / len(docs) < 0.45  # weight 0.5 beside the base kinds' 1.0
    labels = []
    for doc in drills:
        lines = doc.split("\n")
        if lines[0].startswith("List: "):
            pairs = tuple((int(x), c) for x, c in (p.split() for p in lines[0].removeprefix("List: ").split(" , ")))
            lookups = lines[1].removeprefix("Lookups: ").removesuffix(".").split(". ")
            assert sorted(int(item.split()[0]) for item in lookups) == sorted(x for x, _ in pairs)
            for item in lookups:
                x, label = item.split()
                for want in LABELS:  # the review's goal check starts with the drill's lookup
                    check = justification_for(Task("pick_labeled", (pairs, want), ""), x)[1]
                    assert f" {x} {label} , want {want}: {'yes' if want == label else 'no'}." in check
                labels.append(label)
        else:
            a = tuple(int(x) for x in lines[0].removeprefix("First list: ").split())
            b = tuple(int(x) for x in lines[1].removeprefix("Second list: ").split())
            checks = lines[2].removeprefix("Checks: ").removesuffix(".").split(". ")
            assert sorted(int(c.split()[0]) for c in checks) == sorted(a)
            for c in checks:
                x = int(c.split()[0])
                assert c.endswith(": yes") == (x not in b)
                task = Task("pick_missing", (a, b), "")
                assert f" {c}." in justification_for(task, str(x))[1]
    assert set(labels) == set(LABELS)
    # a lookup is an induction step only if the number is the same piece in the list and in the lookup
    # (a number that starts a line is "31", not " 31": the first drills had that, and M0 stayed at chance)
    import sentencepiece as spm

    from loop.world.tokenizer_train import train_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(train_tokenizer(docs, tmp_path / "tok.model", 512)))
    for doc in drills[:20]:
        head, tail = doc.split("\n", 1) if doc.startswith("List: ") else doc.rsplit("\n", 1)
        numbers = lambda text: {p for p in sp.encode_as_pieces(text) if p.strip("▁").isdigit()}
        assert numbers(tail) <= numbers(head), doc
    # the default world has no family with drills: the share changes nothing but the mix's draws
    assert not any(d.startswith(("List: ", "First list: ")) for d in corpus_documents(1, 100, set(), CorpusMix(lookups=0.5)))


def _small_world(**kw) -> World:
    return World(WorldConfig(n_ift=60, n_eft_train=20, n_eft_eval=10, n_eval_prompts=30, **kw))


def test_seed_is_deterministic_disjoint_and_ranked(tmp_path):
    world = _small_world()
    paths = world.build_seed(tmp_path / "a")
    again = _small_world().build_seed(tmp_path / "b")
    for split, path in paths.items():
        assert path.read_bytes() == again[split].read_bytes(), split
    other = _small_world(seed=1).build_seed(tmp_path / "c")
    assert paths["ift"].read_bytes() != other["ift"].read_bytes()
    recs = {split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in paths.items()}
    assert [len(recs[s]) for s in ("ift", "eval_prompts")] == [60, 30]
    prompts = {s: {r["prompt"] for r in recs[s]} for s in recs}
    splits = list(prompts)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not prompts[a] & prompts[b], (a, b)
    for r in recs["ift"]:
        assert grade(r["prompt"], r["response"]).score == 5
    for split in ("eft_train", "eft_eval"):
        groups = {}
        for r in recs[split]:
            assert set(r) == {"id", "group_id", "prompt", "response", "rank", "judgment", "score"}
            assert parse_score(r["judgment"]) == r["score"] == grade(r["prompt"], r["response"]).score
            groups.setdefault(r["group_id"], []).append(r)
        assert len(groups) == {"eft_train": 20, "eft_eval": 10}[split]
        for group in groups.values():
            assert len({r["response"] for r in group}) == len(group) == 4
            assert len({r["rank"] for r in group}) >= 2
            best = max(r["score"] for r in group)
            for r in group:  # rank 0 = best, ties share a rank, order follows the score
                assert (r["rank"] == 0) == (r["score"] == best)
                for s in group:
                    assert (r["rank"] < s["rank"]) == (r["score"] > s["score"])
        assert sum(len({r["rank"] for r in g}) >= 3 for g in groups.values()) >= len(groups) // 2
    ids = [r["id"] for s in recs.values() for r in s]
    assert len(ids) == len(set(ids))


def test_eft_covers_model_like_errors():
    recs = World(WorldConfig(n_ift=10, n_eft_train=200, n_eft_eval=10, n_eval_prompts=10)).seed_records()
    scores = [r["score"] for r in recs["eft_train"]]
    assert all(scores.count(float(s)) >= 20 for s in range(6)), [scores.count(float(s)) for s in range(6)]


def test_judge_template_has_the_paper_structure():
    text = load_template(World.judge_template_path)
    assert "additive 5-point" in text and "Score: <total points>" in text
    assert len(text.split()) < 110  # a tiny model reads it for every judgment


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="n_ift"):
        WorldConfig(n_ift=0)
    with pytest.raises(ConfigError, match="model_preset"):
        WorldConfig(model_preset="nope")
    with pytest.raises(ConfigError, match="unknown key"):
        WorldConfig.from_dict({"n_ift": 5, "bogus": 1})


def test_tokenizer_is_deterministic_and_keeps_numbers_whole(tmp_path):
    import sentencepiece as spm

    from loop.world.corpus import corpus_documents
    from loop.world.m0 import tokenizer_texts
    from loop.world.tokenizer_train import train_tokenizer

    docs = corpus_documents(0, 400, set())
    template = World.judge_template_path.read_text()
    a = train_tokenizer(tokenizer_texts(docs, template), tmp_path / "a.model", 512)
    b = train_tokenizer(tokenizer_texts(docs, template), tmp_path / "b.model", 512)
    assert a.read_bytes() == b.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(a))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    pieces = sp.encode("[INST] Give two digits that sum to 9. [/INST] 4 5", out_type=str)
    assert "[INST]" in pieces and "[/INST]" in pieces
    assert "9." not in "".join(p + "|" for p in pieces).replace("▁", "").split("|")  # number apart from "."
    assert sp.decode(sp.encode("Score: 5 ; 12 < 18 < 30 é")) == "Score: 5 ; 12 < 18 < 30 é"  # byte fallback
    # The loop's expected-score judge needs "Score: k" = shared prefix + one score token.
    encoded = [sp.encode(f"Score: {k}") for k in range(6)]
    assert len({tuple(e[:-1]) for e in encoded}) == 1 and len({e[-1] for e in encoded}) == 6


def test_corpus_excludes_seed_instructions():
    from loop.world.corpus import corpus_documents

    world = _small_world()
    forbidden = world.seed_instructions()
    docs = corpus_documents(0, 2000, forbidden)
    text = "\n".join(docs)
    lines = {line.split(": ", 1)[-1] for line in text.splitlines()} | {
        line.split(". ", 1)[-1] for line in text.splitlines()}
    assert not forbidden & lines
    assert corpus_documents(0, 50, forbidden) == docs[:50]


def test_copy_documents_only_when_asked():
    """CorpusMix.copy adds number lists written twice; at 0 (the default) the corpus is the same text as before
    the kind existed (the hash is of the 2026-12-02 corpus, seed 0, 400 documents)."""
    import hashlib

    from loop.world.corpus import CorpusMix, corpus_documents

    plain = corpus_documents(0, 400, set())
    assert hashlib.sha256("\x00".join(plain).encode()).hexdigest()[:16] == PLAIN_CORPUS_400
    mixed = corpus_documents(0, 400, set(), CorpusMix(copy=0.25))
    copies = [d for d in mixed if d.startswith("Numbers: ")]
    assert 0.1 < len(copies) / len(mixed) < 0.3 and not any(d.startswith("Numbers: ") for d in plain)
    for doc in copies:
        lines = doc.split("\n")
        for first, again in zip(lines[::2], lines[1::2]):
            assert again == "Again: " + first.removeprefix("Numbers: ")
    with pytest.raises(ConfigError, match="corpus_copy_share"):
        WorldConfig(corpus_copy_share=1.0)


PLAIN_CORPUS_400 = "6d9aa99df8690cdb"  # corpus.py at commit 8e7d8e8


def test_a_corpus_without_answers_keeps_the_checks_and_the_other_shares(tmp_path):
    """corpus_answers=False drops the task-with-answer documents only: reviews, check documents and drills stay,
    each at the share the config gives it."""
    from loop.world.m0 import corpus_and_tokenizer, m0_cache_key

    qa = re.compile(r"^Task: [^\n]*\nAnswer: ", re.MULTILINE)
    fields = dict(families=["pick_missing"], corpus_docs=1200, tokenizer_vocab_size=512, corpus_check_share=0.2,
                  corpus_lookup_share=0.3)
    shares = {}
    for answers in (True, False):
        cfg = WorldConfig(**fields, corpus_answers=answers)
        docs, tok = corpus_and_tokenizer(cfg, tmp_path / str(answers), World(cfg).seed_instructions(), "Score:")
        assert tok.is_file()
        shares[answers] = sum(d.startswith("First list:") for d in docs) / len(docs)
        assert any(qa.search(d) for d in docs) == answers
        assert any("\nReview: " in d for d in docs) and any("\nCheck: " in d for d in docs)
    assert 0.25 < shares[True] < 0.35 and 0.25 < shares[False] < 0.35  # the drills' share, 0.3, either way
    assert m0_cache_key(WorldConfig(**fields)) != m0_cache_key(WorldConfig(**fields, corpus_answers=False))
    with pytest.raises(ConfigError, match="corpus_answers"):
        WorldConfig(corpus_answers="no")


def test_check_documents_hold_one_true_or_false_check_each():
    """CorpusMix.checks: tasks with a response and one review check; the verdict is the grader's own check of
    that response, and failed checks are about as common as passed ones (reviews mostly pass them)."""
    import re

    from loop.world.corpus import CorpusMix, corpus_documents
    from loop.world.tasks import FAMILIES, parse_task

    mixed = corpus_documents(0, 400, set(), CorpusMix(checks=0.25))
    docs = [d for d in mixed if "\nCheck: " in d]
    assert 0.1 < len(docs) / len(mixed) < 0.3
    verdicts = []
    for doc in docs:
        for part in doc.split("\n\n"):
            task_line, response_line, check_line = part.split("\n")
            task = parse_task(task_line.removeprefix("Task: "))
            response = response_line.removeprefix("Response: ")
            phrase, verdict = check_line.removeprefix("Check: ").rsplit(": ", 1)
            items = [int(x) for x in re.findall(r"\d+", response)]
            family = FAMILIES[task.family]
            assert len(items) == family.count(task.params)  # the count check passed: the items rule is next
            results = {family.items_ok(task.params, items), family.goal_ok(task.params, items)}
            assert (verdict == "yes", phrase) in results
            verdicts.append(verdict)
    assert 0.35 < verdicts.count("no") / len(verdicts) < 0.65
    with pytest.raises(ConfigError, match="corpus_check_share"):
        WorldConfig(corpus_check_share=1.0)
    with pytest.raises(ConfigError, match="corpus_copy_share \\+ corpus_check_share"):
        WorldConfig(corpus_copy_share=0.5, corpus_check_share=0.5)


def test_build_m0_is_cached(tmp_path):
    from model.checkpoint import load_pretrained

    cfg = WorldConfig(n_ift=20, n_eft_train=5, n_eft_eval=5, n_eval_prompts=5, corpus_docs=300,
                      pretrain_steps=3, pretrain_batch=2, pretrain_seq_len=64, tokenizer_vocab_size=512,
                      model_overrides={"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                                       "max_seq_len": 128})
    logs = []
    ckpt, tok = World(cfg).build_m0(tmp_path, log=logs.append)
    assert (ckpt / "config.json").is_file() and tok.is_file() and tok.parent == ckpt
    assert logs  # it trained
    model = load_pretrained(ckpt)
    assert model.config.vocab_size == 512 and model.config.dim == 32
    stamp = (ckpt / "config.json").stat().st_mtime_ns
    logs.clear()
    assert World(cfg).build_m0(tmp_path, log=logs.append) == (ckpt, tok)
    assert not logs and (ckpt / "config.json").stat().st_mtime_ns == stamp
    other, _ = World(cfg.__class__(**{**cfg.to_dict(), "pretrain_steps": 4})).build_m0(tmp_path, log=None)
    assert other != ckpt


def test_build_m0_probes_during_pretraining_without_changing_its_weights(tmp_path):
    # bench/m0_curve.py's claim: the M0 probed every few steps is byte for byte the M0 of a plain build
    import torch

    from model.tokenizer import load_tokenizer

    cfg = WorldConfig(n_ift=20, n_eft_train=5, n_eft_eval=5, n_eval_prompts=5, corpus_docs=300,
                      pretrain_steps=5, pretrain_batch=2, pretrain_seq_len=64, tokenizer_vocab_size=512,
                      model_overrides={"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                                       "max_seq_len": 128})
    plain, _ = World(cfg).build_m0(tmp_path / "plain", log=None)
    seen = []

    def on_eval(steps, model, tokenizer_path):
        assert not model.training and not torch.is_grad_enabled()
        ids = load_tokenizer(tokenizer_path).encode("Task: 12 red", bos=True, eos=False)
        seen.append(steps)
        return {"first_logit": round(float(model(torch.tensor([ids]))[0, -1, 0]), 4)}

    probed, _ = World(cfg).build_m0(tmp_path / "probed", log=None, on_eval=on_eval, eval_every=2)
    assert seen == [2, 4, 5]  # every 2 steps and after the last
    assert (plain / "model.safetensors").read_bytes() == (probed / "model.safetensors").read_bytes()
    evals = json.loads((probed.parent / "pretrain_log.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [2, 4, 5] and all("first_logit" in e for e in evals)


def test_evidence_tables_report_mean_and_spread():
    from bench.evidence import mean_spread, tables

    assert mean_spread([1.0, 2.0, 3.0]) == "2 ± 1"
    assert mean_spread([None, 4.0]) == "4 (n=1)"
    assert mean_spread([None]) == "-"

    def run(score, pairwise):
        return {"evals": {"sft_baseline": {"grader": {"mean_score": score, "accuracy": 10.0}},
                          "M1": {"grader": {"mean_score": score + 1, "accuracy": 20.0},
                                 "reward_model": {"pairwise_accuracy": pairwise, "spearman": float("nan")}}},
                "head_to_head": {"M1 vs sft_baseline": {"win": 50.0, "loss": 20.0, "tie": 30.0}}}

    text = tables({0: run(2.0, 60.0), 1: run(3.0, 70.0), 2: run(4.0, 80.0)}, {0: 100.0, 1: 110.0, 2: 120.0})
    assert "| GT mean score | 3 ± 1 | 4 ± 1 |" in text
    assert "| judge pairwise % | - | 70 ± 10 |" in text
    assert "| judge Spearman | - | - |" in text  # NaN is no value
    assert "| M1 vs sft_baseline | 50 ± 0 | 20 ± 0 | 30 ± 0 |" in text
    assert "110 ± 10 s" in text


def test_pretrain_steps_by_the_engine_schedule():
    """M0 pretraining steps by the engine's schedule: linear warmup, then cosine to the floor, every step."""
    import torch

    from engine.schedule import cosine_lr
    from loop.world.m0 import pretrain

    cfg = WorldConfig(pretrain_steps=7, pretrain_warmup=2, pretrain_batch=2, pretrain_seq_len=16,
                      pretrain_lr=1e-2, pretrain_min_lr=1e-3, pretrain_weight_decay=0.5, tokenizer_vocab_size=512,
                      model_overrides={"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 32,
                                       "max_seq_len": 32})

    class Sink:
        def __init__(self):
            self.records = []

        def begin(self, _):
            pass

        def step(self, record):
            self.records.append(record)

    rows = torch.randint(0, 512, (6, 17), generator=torch.Generator().manual_seed(0))
    sink = Sink()
    model, _ = pretrain(cfg, rows, log_every=1, log=None, metrics=sink)
    want = [cosine_lr(s, 7, 1e-2, 1e-3, 2) for s in range(7)]
    assert [r["lr"] for r in sink.records] == pytest.approx(want, rel=1e-12)
    assert want[1] == pytest.approx(1e-2) and want[-1] > 1e-3  # warmup reached the peak; the floor is at step 7


def test_eval_prompts_beyond_the_seed_leave_the_seed_and_m0_recipe_alone(tmp_path):
    from loop.world.corpus import corpus_documents
    from loop.world.m0 import m0_cache_key

    cfg = WorldConfig(n_ift=40, n_eft_train=5, n_eft_eval=5, n_eval_prompts=10, families=["pick_labeled", "pick_missing"])
    world = World(cfg)
    seed_eval = world.seed_records()["eval_prompts"]
    more = world.eval_prompts(60)
    assert more[:10] == seed_eval and world.eval_prompts() == seed_eval and world.eval_prompts(4) == seed_eval[:4]
    added = {p["prompt"] for p in more[10:]}
    assert len({p["prompt"] for p in more}) == 60 and len({p["id"] for p in more}) == 60
    assert not added & world.seed_instructions()
    assert not added & {p["prompt"] for p in world.validation_prompts(1000)}
    assert World(cfg).eval_prompts(60) == more  # deterministic
    paths = world.build_seed(tmp_path, eval_prompts=60)
    assert sum(1 for _ in open(paths["eval_prompts"], encoding="utf-8")) == 60
    # the added prompts change neither the config (M0's key) nor the seed instructions its corpus leaves out
    fresh = World(WorldConfig.from_dict(cfg.to_dict()))
    assert m0_cache_key(world.cfg) == m0_cache_key(fresh.cfg) and world.seed_instructions() == fresh.seed_instructions()
    # the M0 corpus leaves out the seed instructions only; the added prompts are too rare to be drawn into it
    docs = corpus_documents(cfg.seed, 3000, world.seed_instructions(), families=cfg.families)
    assert sum(any(p in d for p in added) for d in docs) == 0
