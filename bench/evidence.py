"""Run the embedded default loop with several seeds and print mean and spread per model.

    python bench/evidence.py                         # seeds 0 1 2, configs/cpu_default.yaml
    python bench/evidence.py --seeds 0 1 2 --out bench/RESULTS.md --runs-dir runs/evidence
    python bench/evidence.py --collect-only          # tables from finished runs, no training

Each seed is one `loop/iterate.py` run in its own directory (`run.seed` and the world's seed both set
to the seed, so seed data, M0 and sampling all vary); a finished run is resumed, not redone. With
`--world-seed S` every run keeps the world's seed S (the same seed data and M0, e.g. a shipped one that
took an hour to pretrain) and only `run.seed` varies: SFT order, prompts, samples, judgments, DPO. The
numbers come from each run's eval stage (loop.report.collect): ground-truth mean score and exact-
correct rate of greedy responses on held-out instructions, the model-as-judge metrics on the
held-out EFT set, head-to-head win rates, and wall time per run.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.atomic import atomic_write_text  # noqa: E402

# (label, path into an eval summary)
MODEL_METRICS = (
    ("GT mean score", ("grader", "mean_score")),
    ("GT exact %", ("grader", "accuracy")),
    ("GT exact % (sampled)", ("self_pairs", "sampled_grader", "accuracy")),
    ("judge pairwise %", ("reward_model", "pairwise_accuracy")),
    ("judge 5-best %", ("reward_model", "five_best")),
    ("judge exact match %", ("reward_model", "exact_match")),
    ("judge Spearman", ("reward_model", "spearman")),
    ("judge Kendall tau", ("reward_model", "kendall_tau")),
    ("judge parse rate", ("reward_model", "parse_rate")),
    ("judge self-pair %", ("self_pairs", "accuracy")),
    ("vote self-pair %", ("self_pairs", "vote", "accuracy")),
    ("response tokens", ("length", "mean_tokens")),
)


def run_seed(seed: int, run_dir: Path, config: Path, nproc: int, extra: list[str],
             world_seed: int | None = None) -> float:
    """Run (or resume) one seed's loop; returns its wall time in seconds."""
    script = str(REPO / "loop" / "iterate.py")
    launcher = [sys.executable, script] if nproc <= 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    cmd = launcher + ["--config", str(config), "--run-dir", str(run_dir)]
    if run_dir.exists():
        cmd.append("--resume")
    cmd += [f"run.seed={seed}", f"data.world.seed={seed if world_seed is None else world_seed}", *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - t0


def _get(d: dict | None, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d if isinstance(d, (int, float)) and not (isinstance(d, float) and math.isnan(d)) else None


def mean_spread(values: list[float]) -> str:
    """'mean ± sample std (n)' over the seeds that produced a value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.3g} (n=1)"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.3g} ± {sd:.2g}" + (f" (n={len(vals)})" if len(vals) != 3 else "")


def tables(runs: dict[int, dict], walls: dict[int, float | None]) -> str:
    models = []
    for data in runs.values():
        for m in data["evals"]:
            if m not in models:
                models.append(m)
    lines = [f"Seeds: {', '.join(map(str, runs))}. Cells: mean ± std over seeds.", "",
             "| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for label, path in MODEL_METRICS:
        row = [mean_spread([_get(data["evals"].get(m), path) for data in runs.values()]) for m in models]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    h2h_names = []
    for data in runs.values():
        for name in data["head_to_head"]:
            if name not in h2h_names:
                h2h_names.append(name)
    if h2h_names:
        lines += ["", "| head-to-head (ground truth: one deterministic verdict per prompt) | win % | loss % | tie % |", "|---|---|---|---|"]
        for name in h2h_names:
            cells = [mean_spread([_get(data["head_to_head"].get(name), (k,)) for data in runs.values()])
                     for k in ("win", "loss", "tie")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    known = [w for w in walls.values() if w is not None]
    if known:
        lines += ["", f"Wall time per run: {mean_spread(known)} s "
                      f"({', '.join(f'seed {s}: {w:.0f}s' for s, w in walls.items() if w is not None)})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "cpu_default.yaml")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "evidence")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) ")
    ap.add_argument("--world-seed", type=int, default=None,
                    help="keep the world's seed (seed data, M0) fixed; only run.seed varies")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    ap.add_argument("--collect-only", action="store_true", help="only tabulate finished runs")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = ap.parse_args(argv)

    from loop.report import collect

    walls: dict[int, float | None] = {}
    runs = {}
    for seed in args.seeds:
        run_dir = args.runs_dir / f"seed_{seed}"
        walls[seed] = None if args.collect_only else run_seed(seed, run_dir, args.config, args.nproc,
                                                              args.overrides, args.world_seed)
        if not run_dir.exists():
            raise SystemExit(f"bench/evidence.py: {run_dir} does not exist (run without --collect-only first)")
        runs[seed] = collect(run_dir)
    text = tables(runs, walls)
    if args.world_seed is not None:
        text = f"World seed (seed data, M0) {args.world_seed} in every run; run.seed varies.\n" + text
    print(text)
    if args.out:
        atomic_write_text(args.out, f"# Evidence: the embedded default over {len(runs)} seeds\n\n"
                       f"Config: {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}"
                       f"{' ' + ' '.join(args.overrides) if args.overrides else ''}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
