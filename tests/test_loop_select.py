"""Checkpoint selection (loop/checkpoint_select.py): candidates in step order, the choice and its tie-break, the swap of
M(t+1) that survives a kill in the middle, fresh world validation prompts, and the whole selection through
the real generation and pairwise-judging path with scripted models (every candidate against M(t), one
fixed judge)."""
import json
import pathlib
import re

import pytest

from engine.distributed import init_distributed
from engine.sampler.sampler import Completion
from loop.config import LoopConfigError, config_from_dict
from loop.records import read_jsonl
from loop.checkpoint_select import Candidate, apply_choice, candidates_dir, choose, list_candidates, select_checkpoint
from model.tokenizer import load_tokenizer
from test_loop_pairwise import ScriptedJudge  # a pairwise judge applying a rule to the two answers

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llama2-spm"


def _model_dir(path: pathlib.Path, tag: str) -> pathlib.Path:
    path.mkdir(parents=True)
    (path / "weights.txt").write_text(tag)
    return path


def test_candidates_in_step_order_and_last_step_is_the_model(tmp_path):
    final = _model_dir(tmp_path / "models" / "M2", "step30")
    folder = candidates_dir(final)
    assert folder.name == "M2.candidates"
    for step in (20, 10, 30):  # step30 in the folder is the last step moved aside by an earlier choice
        _model_dir(folder / f"step{step}", f"step{step}")
    (folder / "notes").mkdir()
    got = list_candidates(final, 30)
    assert [(c.name, c.step) for c in got] == [("step10", 10), ("step20", 20), ("step30", 30)]
    assert got[-1].path == final
    assert [c.name for c in list_candidates(tmp_path / "models" / "M3", 7)] == ["step7"]  # no folder: last only


def test_choose_best_win_minus_loss_ties_to_later_step():
    r = [{"step": 10, "win": 50.0, "loss": 10.0}, {"step": 20, "win": 60.0, "loss": 20.0},
         {"step": 30, "win": 45.0, "loss": 10.0}]
    assert choose(r)["step"] == 20  # 40 and 40 beat 35: the later of the two best
    assert choose([{"step": 10, "win": 70.0, "loss": 0.0}, {"step": 20, "win": 0.0, "loss": 0.0}])["step"] == 10


def test_apply_choice_swaps_and_completes_after_a_kill(tmp_path):
    final = _model_dir(tmp_path / "M2", "last")
    _model_dir(candidates_dir(final) / "step5", "early")
    work = tmp_path / "work"
    work.mkdir()
    apply_choice(final, "step5", "step5", work)  # chosen == last: nothing moves
    assert (final / "weights.txt").read_text() == "last"
    apply_choice(final, "step5", "step9", work)
    assert (final / "weights.txt").read_text() == "early"
    assert (candidates_dir(final) / "step9" / "weights.txt").read_text() == "last"
    assert json.loads((work / "choice.json").read_text()) == {"chosen": "step5", "last": "step9"}
    apply_choice(final, "step5", "step9", work)  # a rerun changes nothing
    assert (final / "weights.txt").read_text() == "early"
    # Killed after the last step moved aside, before the chosen weights moved in: the rerun completes it.
    final2 = _model_dir(tmp_path / "b" / "M2", "last")
    _model_dir(candidates_dir(final2) / "step5", "early")
    (work / "choice.json").unlink()
    (candidates_dir(final2)).joinpath("step9").parent.mkdir(exist_ok=True)
    final2.rename(candidates_dir(final2) / "step9")
    apply_choice(final2, "step5", "step9", work)
    assert (final2 / "weights.txt").read_text() == "early"
    with pytest.raises(RuntimeError, match="choice.json: an earlier run chose differently"):
        apply_choice(final2, "step7", "step9", work)


def test_world_validation_prompts_are_fresh_and_deterministic():
    from loop.world import World, WorldConfig

    w = World(WorldConfig(n_ift=50, n_eft_train=5, n_eft_eval=5, n_eval_prompts=20))
    v = w.validation_prompts(40)
    assert len({p["prompt"] for p in v}) == 40 and v == w.validation_prompts(40)
    assert not {p["prompt"] for p in v} & w.seed_instructions()
    assert [p["id"] for p in v[:2]] == ["valid-00000", "valid-00001"]
    assert World(WorldConfig(seed=1)).validation_prompts(5) != World(WorldConfig(seed=0)).validation_prompts(5)


def test_config(tmp_path):
    with pytest.raises(LoopConfigError, match="select.prompts_path is required"):
        config_from_dict({"data": {"source": "oasst", "oasst_path": "x.jsonl"}, "model": {"init": "m"},
                          "select": {"enabled": True}}).validate()
    with pytest.raises(LoopConfigError, match="select.prompts_path is 'nope.jsonl': no such file"):
        config_from_dict({"select": {"enabled": True, "prompts_path": "nope.jsonl"}}).validate()
    with pytest.raises(LoopConfigError, match="select.every must be >= 0"):
        config_from_dict({"select": {"enabled": True, "every": -1}}).validate()
    config_from_dict({"select": {"enabled": True}}).validate()  # the world brings its own prompts


class Scripted:
    """A 'model' answering every prompt with one fixed text per prompt id (found in the prompt)."""

    def __init__(self, tok, answers: dict[str, str]):
        self.tok, self.answers, self.calls = tok, answers, 0
        self.model = type("M", (), {"config": type("C", (), {"max_seq_len": 4096})()})()

    def generate(self, prompts, params, progress=False):
        out = []
        for i, ids in enumerate(prompts):
            pid = re.search(r"question (q\d+)", self.tok.decode(ids)).group(1)
            text = self.answers[pid]
            out.append(Completion(i, 0, self.tok.encode(text, bos=False), text, "stop"))
            self.calls += 1
        return out


def test_selection_through_generation_and_pairwise_judging(tmp_path):
    tok = load_tokenizer(FIXTURE)
    cfg = config_from_dict({"select": {"enabled": True}, "eval": {"max_new_tokens": 8}, "run": {"chunk_size": 2}})
    prompts = [{"id": f"q{i}", "prompt": f"question q{i}"} for i in range(4)]
    current = tmp_path / "M1"
    cands = [Candidate("step2", 2, tmp_path / "c2"), Candidate("step4", 4, tmp_path / "c4"),
             Candidate("step6", 6, tmp_path / "M2")]
    # M(t) answers "ok"; step2 is longer on 3 prompts, step4 on all 4, step6 (last) on 2 and shorter on 2.
    models = {current: Scripted(tok, {f"q{i}": "ok" for i in range(4)}),
              cands[0].path: Scripted(tok, {"q0": "a long one", "q1": "longer", "q2": "so long", "q3": "o"}),
              cands[1].path: Scripted(tok, {f"q{i}": "much longer answer" for i in range(4)}),
              cands[2].path: Scripted(tok, {"q0": "long answer", "q1": "long", "q2": "k", "q3": "n"})}
    asked = []

    def sampler_for(path):
        asked.append(path)
        return models[path]

    judge = ScriptedJudge(tok, lambda a, b: "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")
    work = tmp_path / "work"
    work.mkdir()
    kw = dict(sampler_for=sampler_for, judge=lambda: (judge, tok, "M1 (the model before DPO)"), tok=tok,
              dist=init_distributed(), cfg=cfg, t=1, current=current, candidates=cands, prompts=prompts, work=work)
    s = select_checkpoint(**kw)
    assert asked[0] == cands[-1].path  # the last step first: its weights may be handed over in memory
    assert s["chosen"] == "step4" and s["chosen_step"] == 4 and s["last_step"] == 6 and s["against"] == "M1"
    by = {c["checkpoint"]: c for c in s["candidates"]}
    assert (by["step2"]["win"], by["step2"]["loss"]) == (75.0, 25.0)
    assert (by["step4"]["win"], by["step4"]["win_rate"]) == (100.0, 1.0)
    assert (by["step6"]["win"], by["step6"]["loss"]) == (50.0, 50.0)
    assert judge.calls == 3 * 4 * 2  # every candidate, every prompt, both orders
    assert len(read_jsonl(work / "pairwise_step4.jsonl")) == 8 and len(read_jsonl(work / "answers_reference.jsonl")) == 4
    # Resumed: every answer and judgment is read back, nothing is generated again, the choice is the same.
    for m in (*models.values(), judge):
        m.calls = 0
    assert select_checkpoint(**kw) == s and judge.calls == 0 and all(m.calls == 0 for m in models.values())


@pytest.mark.slow
@pytest.mark.multiproc
def test_loop_selects_among_dpo_checkpoints_on_two_ranks(tmp_path):
    """The whole loop with selection on, 2 ranks (ZeRO-3): DPO exports a candidate every select.every steps,
    stage 7 answers the world's fresh validation prompts with each and with M1, judges them, and models/M2
    holds the chosen candidate's weights."""
    import hashlib

    import test_loop_dist as D

    run = tmp_path / "run"
    cmd = D._torchrun(["--standalone", "--nproc_per_node=2"], run, tmp_path / "cache", "select.enabled=true",
                      "select.every=3", "select.prompts=3", "dpo.epochs=2", "eval.pairwise=false")
    D._watch(D._launch([cmd], tmp_path / "run.log"), tmp_path / "run.log")
    s = json.loads((run / "iter_1" / "7_select" / "done.json").read_text())
    dpo = json.loads((run / "iter_1" / "6_dpo" / "done.json").read_text())
    last = dpo["steps"]
    steps = [c["step"] for c in s["candidates"]]
    assert steps == [*range(3, last, 3), last] and len(steps) >= 2
    assert s["judge"] == "M1 (the model before DPO)" and s["against"] == "M1" and s["prompts"] == 3
    for c in s["candidates"]:
        assert c["win"] + c["tie"] + c["loss"] == pytest.approx(100.0)
    assert s["chosen"] in [c["checkpoint"] for c in s["candidates"]]

    def weights(d):
        return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(d.glob("*.safetensors")))).hexdigest()

    folder = run / "models" / "M2.candidates"
    chosen = run / "models" / "M2" if s["chosen"] == f"step{last}" else folder / s["chosen"]
    assert weights(run / "models" / "M2") == weights(chosen)
    first, second = (folder / f"step{n}" if n < last else run / "models" / "M2" for n in steps[:2])
    assert weights(first) != weights(second)  # exported at different points of training
    assert len(read_jsonl(run / "iter_1" / "7_select" / "answers_reference.jsonl")) == 3
    assert (run / "eval" / "M2" / "done.json").exists()
