"""Are the loop's own DPO pairs right? (issue #13, offline, after a world run; uses the grader)

    python bench/pair_audit.py runs/cpu_lookup

For every iteration's pairs (iter_N/4_pairs/pairs.jsonl) the world's ground-truth grader scores the chosen and
the rejected response. A pair is right when the chosen grades higher, wrong when lower, noise when both grade
the same (DPO then pushes apart two answers of equal worth); identical texts give DPO no gradient at all. The
responses stage (iter_N/2_responses) says how many prompts had samples of different grades at all: the most
right pairs any judge could find. Never part of the loop.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def audit(run_dir: Path, iteration: int) -> Counter | None:
    from loop.records import read_jsonl
    from loop.stages import F, PAIRS, PROMPTS, RESPONSES
    from loop.world import World

    if not PAIRS.path(run_dir, F.PAIRS, iteration).is_file():
        return None
    grade = World.grade
    c: Counter = Counter()
    for p in read_jsonl(PAIRS.path(run_dir, F.PAIRS, iteration), ("prompt", "chosen", "rejected")):
        gc, gr = grade(p["prompt"], p["chosen"]), grade(p["prompt"], p["rejected"])
        c["pairs"] += 1
        c["right" if gc.score > gr.score else "wrong" if gc.score < gr.score else "noise"] += 1
        c["identical"] += p["chosen"] == p["rejected"]
        c["chosen correct"] += gc.correct
        c["rejected correct"] += gr.correct
    prompts = {p["id"]: p["prompt"] for p in read_jsonl(PROMPTS.path(run_dir, F.PROMPTS, iteration), ("id", "prompt"))}
    grades: dict[str, set] = {}
    for r in read_jsonl(RESPONSES.path(run_dir, F.RESPONSES, iteration), ("prompt_id", "text")):
        grades.setdefault(r["prompt_id"], set()).add(grade(prompts[r["prompt_id"]], r["text"]).score)
    c["prompts"] = len(grades)
    c["prompts with different grades"] = sum(len(g) > 1 for g in grades.values())
    return c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    for i in range(1, 100):
        c = audit(args.run_dir, i)
        if c is None:
            break
        n = c["pairs"] or 1
        print(f"iter {i}: {c['pairs']} pairs from {c['prompts']} prompts ({c['prompts with different grades']} with "
              f"samples of different grades); right {c['right']} ({100 * c['right'] / n:.0f}%), noise {c['noise']}, "
              f"wrong {c['wrong']}, identical texts {c['identical']}; chosen correct {100 * c['chosen correct'] / n:.0f}%, "
              f"rejected correct {100 * c['rejected correct'] / n:.0f}%")


if __name__ == "__main__":
    main()
