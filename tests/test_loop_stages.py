"""The stage table (loop/stages.py): today's run-directory layout, names spelled only there, the world
not importing the loop, and the world's grading of the EFT stage's own answers."""
import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from loop import stages as S
from loop.world.eft_own import graded_groups

REPO = Path(__file__).resolve().parent.parent
# The modules that wire stages together: each reads stage and file names from the table.
WIRING = ("iterate.py", "stage_aift.py", "stage_train.py", "stage_eval.py", "stage_eft.py", "stage_dir.py",
          "judge.py", "meta_judge.py", "checkpoint_select.py", "report.py", "report_render.py")


def test_folders_are_todays_layout(tmp_path):
    assert S.PROMPTS.path(tmp_path, S.F.PROMPTS, 2) == tmp_path / "iter_2" / "1_prompts" / "prompts.jsonl"
    assert S.JUDGMENTS.path(tmp_path, S.F.SCORES, 1) == tmp_path / "iter_1" / "3_judgments" / "scores.jsonl"
    assert S.META_JUDGE.folder(tmp_path, 1) == tmp_path / "iter_1" / "3m_meta_judge"
    assert S.SELECT.folder(tmp_path, 3) == tmp_path / "iter_3" / "7_select"
    assert S.SFT.folder(tmp_path, "M1") == tmp_path / "sft" / "M1"
    assert S.EVAL.path(tmp_path, S.F.GRADES, "M2") == tmp_path / "eval" / "M2" / "grades.jsonl"
    assert S.SEED.path(tmp_path, S.F.IFT) == tmp_path / "seed" / "ift.jsonl"
    assert [s.name for s in S.ITERATION] == ["1_prompts", "2_responses", "3_judgments", "3m_meta_judge", "4_pairs",
                                             "5_ref_logprobs", "6_dpo", "7_select"]
    assert S.iteration_of("iter_12") == 12 and S.iteration_of("iter_x") is None and S.iteration_of("eval") is None


def test_bad_lookups_fail_naming_the_stage(tmp_path):
    with pytest.raises(ValueError, match="stage 2_responses writes no scores.jsonl"):
        S.RESPONSES.path(tmp_path, S.F.SCORES, 1)
    with pytest.raises(ValueError, match="stage 1_prompts is per iteration"):
        S.PROMPTS.folder(tmp_path)


def test_table_is_consistent():
    assert len(S.TABLE) == len(S.BEFORE_ITERATIONS + S.ITERATION + (S.EVAL,))  # names unique
    for stage in S.TABLE.values():
        assert set(stage.reads) <= set(S.TABLE), stage.name
        assert len(set(stage.outputs)) == len(stage.outputs), stage.name


def test_every_stage_names_its_function_and_the_orchestrator_calls_it_so():
    """fn resolves to a callable for every stage, and iterate.py reaches a stage function only through the table
    (no import of it by name)."""
    for stage in S.TABLE.values():
        assert callable(stage.function()), stage.name
    tree = ast.parse((REPO / "loop" / "iterate.py").read_text(encoding="utf-8"))
    worker = {st.fn.partition(":")[2] for st in S.TABLE.values()} - {"Loop.prepare"}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert not worker & imported  # the loop tests (test_loop_run, test_loop_dist) run every one of them


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_names_are_spelled_only_in_the_table():
    # The run-level folder names ("seed", "eval", ...) are also config keys and seed salts: only the
    # unambiguous names are checked.
    names = ({s.name for s in S.ITERATION} | {v for k, v in vars(S.F).items() if not k.startswith("_")}
             | {S.DONE, S.PARTIAL})
    found = [f"loop/{f}:{line}: {value}" for f in WIRING for line, value in _string_constants(REPO / "loop" / f)
             if value in names]
    assert found == []


def test_the_world_does_not_import_the_loop():
    for path in sorted((REPO / "loop" / "world").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}:{node.lineno}: imports the loop"
                assert node.level == 1 or not (node.module or "").startswith("loop.") \
                    or node.module.startswith("loop.world"), f"{path.name}:{node.lineno}: imports the loop"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("loop.") or alias.name.startswith("loop.world"), path.name


def test_graded_groups_rank_by_the_grader():
    scores = {"good": 5, "bad": 1, "also good": 5}

    def grade(prompt, answer):
        return SimpleNamespace(score=scores[answer], justification=f"{prompt}: {answer}")

    recs = graded_groups({"g1": "2+2?"}, {"g1": ["good", "bad", "also good"]}, grade)
    assert [r["id"] for r in recs] == ["g1-own0", "g1-own1", "g1-own2"]
    assert {r["group_id"] for r in recs} == {"g1-own"}
    assert [r["score"] for r in recs] == [5.0, 1.0, 5.0]
    best, worst = recs[0]["rank"], recs[1]["rank"]
    assert recs[2]["rank"] == best and best < worst  # rank 0 = best; equal grades share a rank
    assert recs[1]["judgment"] == "2+2?: bad" and recs[0]["prompt"] == "2+2?"
