"""The embedded CPU default: a small instruction world whose answers a program can grade.

Contract with the loop (docs/CONTRACTS.md):
- `WorldConfig` (loop/world/config.py): seed-data sizes, model preset + overrides, tokenizer size,
  M0 pretraining budget. `World(cfg)` exposes:
  - `build_seed(out_dir) -> dict[str, Path]` with keys "ift", "eft_train", "eft_eval", "eval_prompts"
    (files ift.jsonl, eft_train.jsonl, eft_eval.jsonl, eval_prompts.jsonl; atomic; deterministic for
    cfg.seed; the four splits never share an instruction).
  - `build_m0(cache_dir) -> (checkpoint_dir, tokenizer_path)`: HF checkpoint of the pretrained tiny
    Llama (tokenizer.model copied in), cached under cache_dir/m0-<hash of config and world source>, or the
    shipped M0 of that hash (loop/world/m0s/, loop/world/shipped.py) without pretraining.
  - `judge_template_path`: loop/world/judge_template.txt (slots <INSTRUCTION_HERE>, <RESPONSE_HERE>).
  - `meta_template_path`: loop/world/meta_template.txt, the meta-judge prompt (meta.template = world).
  - `validation_prompts(n) -> list[dict]`: n fresh {"id", "prompt"} for checkpoint selection, drawn from
    their own stream of cfg.seed and sharing no instruction with the seed splits (loop/checkpoint_select.py).
  - `is_valid_prompt(text) -> bool`: text is one solvable instruction of this world (the keyword and
    length filter for self-generated prompts; needs no grader).
  - `grade(instruction, response) -> Grade(score, correct, justification)`: ground truth, for seed
    data and evaluation only. Inside `grader_unavailable()` every grade() raises GraderUnavailable.
"""
from __future__ import annotations

import random
from pathlib import Path

from .config import WorldConfig
from .grader import Grade, GraderUnavailable, grade, grader_unavailable
from .seed import _unique_tasks as unique_tasks  # the seed splits' own draw of distinct instructions
from .seed import build_seed_records, write_jsonl
from .tasks import parse_task

__all__ = ["World", "WorldConfig", "Grade", "GraderUnavailable", "grader_unavailable"]

SEED_FILES = {"ift": "ift.jsonl", "eft_train": "eft_train.jsonl", "eft_eval": "eft_eval.jsonl",
              "eval_prompts": "eval_prompts.jsonl"}


class World:
    judge_template_path: Path = Path(__file__).resolve().parent / "judge_template.txt"
    meta_template_path: Path = Path(__file__).resolve().parent / "meta_template.txt"

    def __init__(self, cfg: WorldConfig | None = None):
        self.cfg = cfg or WorldConfig()
        self._records: dict[str, list[dict]] | None = None

    def seed_records(self) -> dict[str, list[dict]]:
        if self._records is None:
            c = self.cfg
            self._records = build_seed_records(c.seed, c.n_ift, c.n_eft_train, c.n_eft_eval, c.n_eval_prompts,
                                               c.eft_group_size, c.families)
        return self._records

    def build_seed(self, out_dir: str | Path, eval_prompts: int | None = None) -> dict[str, Path]:
        """The seed splits as JSONL files; eval_prompts: how many held-out eval prompts (see eval_prompts)."""
        out_dir = Path(out_dir)
        paths = {}
        for split, name in SEED_FILES.items():
            paths[split] = out_dir / name
            records = self.eval_prompts(eval_prompts) if split == "eval_prompts" else self.seed_records()[split]
            write_jsonl(paths[split], records)
        return paths

    def eval_prompts(self, n: int | None = None) -> list[dict]:
        """n held-out eval prompts: the seed's first, then (n above the seed's n_eval_prompts) prompts from a
        stream of their own outside every seed split and the validation stream's first 1,000. The seed's
        sizes shape M0's corpus (it leaves out every seed instruction), so a bigger eval set drawn this way
        leaves the M0 and its recipe key unchanged; the M0 corpus may hold one of the added prompts by chance
        (each is one of ~10^9 or more task texts, so that is rare; tests/test_world.py measures it)."""
        base = self.seed_records()["eval_prompts"]
        if n is None or n <= len(base):
            return base[:n] if n is not None else base
        seen = self.seed_instructions() | {p["prompt"] for p in self.validation_prompts(1000)}
        return base + self._fresh_prompts(f"world-eval-{self.cfg.seed}", n - len(base), seen, "eval", len(base))

    def seed_instructions(self) -> set[str]:
        return {r["prompt"] for records in self.seed_records().values() for r in records}

    def validation_prompts(self, n: int) -> list[dict]:
        # A stream of its own, so the seed splits (and the M0 cache keyed on them) stay as they are.
        return self._fresh_prompts(f"world-valid-{self.cfg.seed}", n, self.seed_instructions(), "valid")

    def _fresh_prompts(self, stream: str, n: int, seen: set[str], kind: str, first: int = 0) -> list[dict]:
        """n distinct prompts of the world's families from the random stream `stream`, none in `seen`; ids
        "{kind}-{first:05d}" on."""
        tasks = unique_tasks(random.Random(stream), n, set(seen), self.cfg.families)
        return [{"id": f"{kind}-{first + i:05d}", "prompt": t.text} for i, t in enumerate(tasks)]

    def build_m0(self, cache_dir: str | Path, log=print, metrics=None, use_shipped: bool = True, on_eval=None,
                 eval_every: int = 0) -> tuple[Path, Path]:
        from .m0 import build_m0

        template = self.judge_template_path.read_text(encoding="utf-8")
        return build_m0(self.cfg, cache_dir, self.seed_instructions(), template, log=log, metrics=metrics,
                        use_shipped=use_shipped, on_eval=on_eval, eval_every=eval_every)

    def is_valid_prompt(self, text: str) -> bool:
        return parse_task(text, self.cfg.families) is not None

    @staticmethod
    def grade(instruction: str, response: str) -> Grade:
        return grade(instruction, response)
