"""The loop's stage table: every stage's folder, the record files it leaves and the stages it reads.

The orchestrator (iterate.py) opens a stage's folder through its entry here and calls the stage's
function through it, resume asks the same folder whether its done marker is there (stage_dir.py), and
the report (report.py) walks the same entries, so a stage or file name is spelled once, in this file.
Folder and file names are the run directory's format (docs/DATA.md): renaming one here makes older run
directories unreadable.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

DONE = "done.json"  # the stage's summary numbers, written last: its presence means the folder is complete
PARTIAL = ".partial"  # suffix of a stage folder still at work

# Where a stage's folder lives in the run directory.
RUN = "run"  # <run>/<name>
PER_MODEL = "per model"  # <run>/<name>/<model>: one folder per trained or evaluated model
PER_ITERATION = "per iteration"  # <run>/iter_<t>/<name>


class F:
    """Record file names (docs/DATA.md gives their fields)."""
    # seed (seed data of the data source)
    IFT, EFT_TRAIN, EFT_EVAL = "ift.jsonl", "eft_train.jsonl", "eft_eval.jsonl"
    EVAL_PROMPTS, EFT_CANDIDATES = "eval_prompts.jsonl", "eft_candidates.jsonl"
    # sft (meta.sft_examples), eft
    META_SFT = "meta_sft.jsonl"
    SAMPLES = "samples.jsonl"
    # 1-4 and 3m
    ATTEMPTS, PROMPTS = "attempts.jsonl", "prompts.jsonl"
    RESPONSES = "responses.jsonl"
    JUDGMENTS, SCORES = "judgments.jsonl", "scores.jsonl"
    COMPARISONS, JUDGE_PAIRS, JUDGE_OUTCOMES = "comparisons.jsonl", "judge_pairs.jsonl", "judge_outcomes.jsonl"
    PAIRS, OUTCOMES = "pairs.jsonl", "outcomes.jsonl"
    # 7_select
    CHOICE = "choice.json"
    # eval
    GENERATIONS, ALPACA_EVAL = "generations.jsonl", "alpaca_eval.json"
    RM_JUDGMENTS, GRADES = "rm_judgments.jsonl", "grades.jsonl"
    SELF_RESPONSES, SELF_JUDGMENTS = "self_responses.jsonl", "self_judgments.jsonl"


@dataclass(frozen=True)
class Stage:
    name: str  # the folder's name
    scope: str  # RUN | PER_MODEL | PER_ITERATION: where the folder sits
    outputs: tuple[str, ...]  # record files the finished folder may hold, besides done.json
    reads: tuple[str, ...]  # names of the stages whose folders it reads
    what: str  # one line for the docs and the report
    fn: str  # "module:function" that does the stage's work; the orchestrator calls it through function()

    def function(self):
        """The callable `fn` names (imported on first use: the table itself imports nothing of the loop)."""
        module, _, qualname = self.fn.partition(":")
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def folder(self, run_dir: Path, key: int | str | None = None) -> Path:
        """This stage's folder; key: the iteration t (PER_ITERATION) or the model's name (PER_MODEL)."""
        run_dir = Path(run_dir)
        if self.scope == RUN:
            return run_dir / self.name
        if key is None:
            raise ValueError(f"stage {self.name} is {self.scope}: its folder needs a key")
        if self.scope == PER_MODEL:
            return run_dir / self.name / str(key)
        return run_dir / iteration_dir(key) / self.name

    def path(self, run_dir: Path, file: str, key: int | str | None = None) -> Path:
        """One of this stage's record files in its finished folder."""
        if file not in self.outputs:
            raise ValueError(f"stage {self.name} writes no {file} (its files: {', '.join(self.outputs) or 'none'})")
        return self.folder(run_dir, key) / file


ITERATION_PREFIX = "iter_"


def iteration_dir(t: int | str) -> str:
    return f"{ITERATION_PREFIX}{t}"


def iteration_of(folder_name: str) -> int | None:
    """t of an iteration folder's name, None for any other name."""
    rest = folder_name.removeprefix(ITERATION_PREFIX)
    return int(rest) if rest != folder_name and rest.isdigit() else None


SEED = Stage("seed", RUN, (F.IFT, F.EFT_TRAIN, F.EFT_EVAL, F.EVAL_PROMPTS, F.EFT_CANDIDATES), (),
             "seed data of data.source (the world, a user's JSONL or HF dataset, OASST)",
             "loop.iterate:Loop.prepare")
M0 = Stage("m0", RUN, (), (), "the base model: pretrained by the world or linked from model.init",
           "loop.iterate:Loop.prepare")
SFT = Stage("sft", PER_MODEL, (F.META_SFT,), ("seed", "m0", "eft"), "SFT of M0: sft_baseline on IFT, M1 on IFT + EFT",
            "loop.stage_train:run_sft")
EFT = Stage("eft", RUN, (F.JUDGMENTS, F.SAMPLES, F.EFT_TRAIN, F.EFT_EVAL), ("seed", "sft"),
            "EFT data from the SFT baseline: its judgments of ranked answers (OASST) or its graded answers (world)",
            "loop.stage_eft:build_eft")
PROMPTS = Stage("1_prompts", PER_ITERATION, (F.ATTEMPTS, F.PROMPTS), ("seed", "1_prompts"),
                "self-instruct: M_t (or prompts.model) writes new prompts", "loop.stage_aift:gen_prompts")
RESPONSES = Stage("2_responses", PER_ITERATION, (F.RESPONSES,), ("1_prompts",), "N responses per prompt",
                  "loop.stage_aift:gen_responses")
JUDGMENTS = Stage("3_judgments", PER_ITERATION, (F.JUDGMENTS, F.SCORES), ("1_prompts", "2_responses"),
                  "K judgments per response by M_t; their mean is the response's score",
                  "loop.stage_aift:judge_responses")
META_JUDGE = Stage("3m_meta_judge", PER_ITERATION, (F.COMPARISONS, F.JUDGE_PAIRS, F.JUDGE_OUTCOMES),
                   ("1_prompts", "2_responses", "3_judgments"), "meta.enabled: M_t judges its judgments",
                   "loop.meta_judge:meta_judge")
PAIRS = Stage("4_pairs", PER_ITERATION, (F.PAIRS, F.OUTCOMES), ("1_prompts", "2_responses", "3_judgments",
                                                               "3m_meta_judge"), "chosen/rejected per prompt",
              "loop.stage_aift:make_pairs")
REF_LOGPROBS = Stage("5_ref_logprobs", PER_ITERATION, (F.PAIRS,), ("4_pairs",),
                     "the pairs with M_t's reference log-probs", "loop.stage_train:run_ref_logprobs")
DPO = Stage("6_dpo", PER_ITERATION, (), ("5_ref_logprobs",), "DPO of M_t on the pairs -> M_{t+1}",
            "loop.stage_train:run_dpo")
SELECT = Stage("7_select", PER_ITERATION, (F.CHOICE,), ("6_dpo",), "which DPO checkpoint becomes M_{t+1}",
               "loop.checkpoint_select:select_checkpoint")
EVAL = Stage("eval", PER_MODEL, (F.GENERATIONS, F.ALPACA_EVAL, F.RM_JUDGMENTS, F.GRADES, F.SELF_RESPONSES,
                                 F.SELF_JUDGMENTS), ("seed", "eft", "eval"),
             "held-out generations, reward-model metrics, grades, self-pair accuracy, pairwise matches",
             "loop.stage_eval:eval_model")

# In the order the orchestrator runs them (loop/iterate.py: Loop.run); META_JUDGE only with meta.enabled.
BEFORE_ITERATIONS = (SEED, M0, SFT, EFT)
ITERATION = (PROMPTS, RESPONSES, JUDGMENTS, META_JUDGE, PAIRS, REF_LOGPROBS, DPO, SELECT)
TABLE = {s.name: s for s in BEFORE_ITERATIONS + ITERATION + (EVAL,)}


def pairwise_file(opponent: str) -> str:
    """eval/<model>/ and 7_select/: the pairwise judge's records of one match."""
    return f"pairwise_{opponent}.jsonl"
