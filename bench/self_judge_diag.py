"""Where does a world model's judge go wrong on its OWN answers? (issue #13, offline, after a run)

    python bench/self_judge_diag.py runs/cpu_default            # M1's self-pair judgments
    python bench/self_judge_diag.py runs/cpu_default --model M3

Reads the eval stage's self-pair records (eval/<model>/self_responses.jsonl with the grader's grade, and
self_judgments.jsonl) and checks every judgment against the grader's own ordered checks of the judged answer:
- copied: the judgment's items check names every number of the answer ("45 < 51 < 48" for the answer "51");
- for answers that fail a check (the items rule or the goal), among the judgments that get that far: does the
  judgment write exactly the check that fails, and does it conclude "no" there?
A judge that copies well and writes the right check but still says "yes" runs the same wrong computation that
produced the answer: no generator-verifier gap for its own mistakes.

It also prints the ceiling of reference-guided judging (MT-Bench's judge prompt carrying the judge's own answer):
a judge that copies and compares perfectly scores a response 5 when its answer equals the reference and 1 when
not, so its self-pair accuracy over the same pairs is an upper bound on any such variant. Two references: the
model's greedy answer to the prompt (eval/<model>/generations.jsonl) and the majority answer of its own samples.
Never part of the loop (it uses the grader).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _checks_said(judgment: str) -> list[str]:
    """The "<phrase>: yes|no" steps of a world judgment, in order, without the final score."""
    return [p.strip().rstrip(".") for p in judgment.split(". ") if ": " in p and not p.strip().startswith("Score")]


def diagnose(run_dir: Path, model: str = "M1") -> Counter:
    from loop.records import read_jsonl
    from loop.stages import EVAL, F, SEED
    from loop.world.tasks import parse_task, run_checks

    prompts = {p["id"]: p["prompt"] for p in read_jsonl(SEED.path(run_dir, F.EVAL_PROMPTS), ("id", "prompt"))}
    responses = {r["id"]: r for r in read_jsonl(EVAL.path(run_dir, F.SELF_RESPONSES, model),
                                                ("id", "prompt_id", "text"))}
    out = Counter()
    for j in read_jsonl(EVAL.path(run_dir, F.SELF_JUDGMENTS, model), ("id", "target_id", "text")):
        r = responses[j["target_id"]]
        truth = run_checks(parse_task(prompts[r["prompt_id"]]), r["text"])
        said = _checks_said(j["text"])
        out["judgments"] += 1
        if len(truth) >= 3 and len(said) >= 3:  # the answer reached the items check, and so did the judgment
            out["items check written"] += 1
            out["answer copied"] += all(n in said[2] for n in re.findall(r"\d+", r["text"]))
        failing = truth[-1] if not truth[-1].passed and truth[-1].name in ("items", "goal") else None
        if failing is None:
            continue
        out[f"fails {failing.name}"] += 1
        step = said[len(truth) - 1] if len(said) >= len(truth) else None
        if step is not None:  # the judgment got as far as the failing check
            out[f"fails {failing.name}: judged"] += 1
            phrase, _, verdict = step.rpartition(": ")
            out[f"fails {failing.name}: exact check"] += phrase == failing.phrase
            out[f"fails {failing.name}: says no"] += verdict == "no"
    return out


def reference_ceiling(run_dir: Path, model: str = "M1") -> dict:
    """Self-pair accuracy of a perfect reference-guided judge, by reference kind, and how often the reference
    itself is correct: {"greedy": {...self_pair_accuracy..., "reference_correct": %}, "majority": {...}}."""
    from collections import Counter

    from loop.records import read_jsonl
    from loop.self_pairs import self_pair_accuracy
    from loop.stages import EVAL, F, SEED
    from loop.vote import answer_key
    from loop.world.grader import grade

    prompts = {p["id"]: p["prompt"] for p in read_jsonl(SEED.path(run_dir, F.EVAL_PROMPTS), ("id", "prompt"))}
    responses = read_jsonl(EVAL.path(run_dir, F.SELF_RESPONSES, model), ("id", "prompt_id", "text"))
    greedy = {g["id"]: g["text"] for g in read_jsonl(EVAL.path(run_dir, F.GENERATIONS, model), ("id", "text"))}
    grades = {r["id"]: float(r["grade"]) if "grade" in r else grade(prompts[r["prompt_id"]], r["text"]).score
              for r in responses}
    by_prompt: dict[str, Counter] = {}
    first_text: dict[tuple[str, str], str] = {}  # (prompt, answer) -> its first response text, for the grader
    for r in responses:
        key = answer_key(r["text"])
        by_prompt.setdefault(r["prompt_id"], Counter())[key] += 1
        first_text.setdefault((r["prompt_id"], key), r["text"])
    references = {
        "greedy": {pid: greedy[pid] for pid in by_prompt if pid in greedy},
        # the most frequent answer (first seen among equals)
        "majority": {pid: first_text[pid, c.most_common(1)[0][0]] for pid, c in by_prompt.items()},
    }
    out = {}
    for kind, ref in references.items():
        scores = {r["id"]: (5.0 if answer_key(r["text"]) == answer_key(ref[r["prompt_id"]]) else 1.0)
                  if r["prompt_id"] in ref else None for r in responses}
        summary = self_pair_accuracy(responses, grades, scores)
        correct = [grade(prompts[pid], text).correct for pid, text in ref.items()]
        summary["reference_correct"] = 100.0 * sum(correct) / len(correct) if correct else None
        out[kind] = summary
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default="M1")
    args = ap.parse_args(argv)
    c = diagnose(args.run_dir, args.model)

    def pct(a, b):
        return f"{c[a]} / {c[b]} ({100.0 * c[a] / c[b]:.0f}%)" if c[b] else "-"

    print(f"{args.run_dir} {args.model}: {c['judgments']} judgments; answer copied into the items check "
          f"{pct('answer copied', 'items check written')}")
    for name in ("items", "goal"):
        judged = f"fails {name}: judged"
        print(f"  answers failing the {name} check ({c[f'fails {name}']}), judged that far {c[judged]}: exact check "
              f"written {pct(f'fails {name}: exact check', judged)}, says no {pct(f'fails {name}: says no', judged)}")
    for kind, r in reference_ceiling(args.run_dir, args.model).items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1f}%"
        ok = "-" if r["reference_correct"] is None else f"{r['reference_correct']:.1f}%"
        print(f"  perfect reference-guided judge, {kind} reference (correct on {ok} of prompts): self-pair {acc} "
              f"({r['agree']} / {r['disagree']} / {r['tie']} agree / disagree / tie of {r['num_pairs']} pairs)")


if __name__ == "__main__":
    main()
