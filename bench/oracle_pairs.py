"""Diagnostic: does DPO from M1 improve the model when the PAIRS are right? (the pilot's lesson 1)

Copies a finished world run up to iteration 1's responses, replaces M1's own judgments with the world's
ground-truth grader (one exact score per response), and resumes the loop for one iteration: the same
pair rules, reference pass, DPO settings and evaluation as the run. If M2 built from grader pairs does
not beat M1, the optimizer setting is the bottleneck; if it does, the judge is.

    python bench/oracle_pairs.py --run runs/cpu_default --out runs/oracle [section.key=value ...]

Never part of the loop itself: AIFT stages must not see the grader (tests/test_loop_run.py checks that).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.distributed import init_distributed, seed_everything  # noqa: E402
from loop.config import load_config  # noqa: E402
from loop.iterate import DEFAULT_CONFIG, Loop  # noqa: E402
from loop.records import read_jsonl, write_json, write_jsonl  # noqa: E402

KEEP = ("seed", "m0", "sft", "eval/sft_baseline", "eval/M1", "models/sft_baseline", "models/M1",
        "iter_1/1_prompts", "iter_1/2_responses")


def copy_run(src: Path, dst: Path) -> None:
    if dst.exists():
        raise SystemExit(f"bench/oracle_pairs.py: {dst} exists; remove it or pick another --out")
    for part in KEEP:
        if not (src / part).exists():
            raise SystemExit(f"bench/oracle_pairs.py: {src / part} is missing (run the loop to iteration 1 first)")
        shutil.copytree(src / part, dst / part, symlinks=True)
    (dst / "models" / "M0").symlink_to((src / "models" / "M0").resolve())


def grader_judgments(run: Path, grade) -> dict:
    prompts = {p["id"]: p["prompt"] for p in read_jsonl(run / "iter_1/1_prompts/prompts.jsonl", ("id", "prompt"))}
    responses = read_jsonl(run / "iter_1/2_responses/responses.jsonl", ("id", "prompt_id", "text"))
    scores = []
    for r in responses:
        g = grade(prompts[r["prompt_id"]], r["text"])
        scores.append({"id": r["id"], "prompt_id": r["prompt_id"], "scores": [float(g.score)], "mean": float(g.score)})
    out = run / "iter_1/3_judgments"
    out.mkdir(parents=True)
    write_jsonl(out / "scores.jsonl", scores)
    hist = {str(k): sum(s["mean"] == k for s in scores) for k in range(6)}
    n = len(scores)  # the keys of a judging stage's summary, so the run's report renders unchanged
    summary = {"judge": "ground-truth grader (diagnostic)", "judgments": n, "parsed": n, "parse_rate": 1.0,
               "responses_without_score": 0, "histogram": hist}
    write_json(out / "done.json", summary)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished world run (configs/cpu_default.yaml)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    src, dst = Path(args.run), Path(args.out)
    cfg = load_config(args.config, args.overrides)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=str(dst), iterations=1))
    dist = init_distributed()
    seed_everything(cfg.run.seed, dist.rank)
    copy_run(src, dst)
    loop = Loop(cfg, dist, dst)
    loop.prepare()
    print(json.dumps(grader_judgments(dst, loop.world.grade)))
    loop.run()
    for name in ("M1", "M2"):
        s = json.loads((dst / "eval" / name / "done.json").read_text())
        print(f"{name}: ground-truth exact {s['grader']['accuracy']:.1f}%, mean score {s['grader']['mean_score']:.2f}")
    print(f"pairs: {json.loads((dst / 'iter_1/4_pairs/done.json').read_text())}")


if __name__ == "__main__":
    main()
