"""Pretrain a world M0 into the loop's cache and probe it as it trains: does a skill arrive with more steps? (#13)

    python bench/m0_curve.py --every 1500 "data.world={families: [pick_labeled, pick_missing], pretrain_steps: 12000}"
    python bench/evidence.py --seeds 0 "data.world={...same...}"     # then reuses this M0 from the cache

Takes the loop's config and overrides (as bench/evidence.py does, seed 0 unless --seed), builds M0 exactly as
the loop's M0 stage would, into `data.world_cache_dir` under the same key, and every `--every` steps runs
bench/copy_probe.py's teacher-forced probe on the weights of that step (the world's families): copied numbers,
looked-up labels, asked labels, verdicts, the failed check's "no", and the greedy answers per family. The probe
draws from no generator of the run's, so the final M0 is byte for byte the one a plain loop run pretrains. Prints one line per probe and a
table at the end; the probes are also kept in the build's pretrain_log.json ("evals").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COLUMNS = ("copied numbers", "looked-up labels", "asked labels", "verdicts", "'no' verdicts", "score")


def main(argv=None) -> int:
    from bench.copy_probe import probe_model
    from loop.config import load_config
    from loop.world import World, WorldConfig
    from loop.world.m0 import m0_cache_key
    from model.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "cpu_default.yaml")
    ap.add_argument("--seed", type=int, default=0, help="run.seed and data.world.seed, as bench/evidence.py sets")
    ap.add_argument("--every", type=int, default=1000, help="probe every this many steps (and after the last)")
    ap.add_argument("--n", type=int, default=300, help="fresh reviews per probe")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, as loop/iterate.py takes them")
    args = ap.parse_args(argv)
    if args.every < 1:
        ap.error("--every must be >= 1")
    cfg = load_config(args.config, [*args.overrides, f"run.seed={args.seed}", f"data.world.seed={args.seed}"])
    world = World(WorldConfig.from_dict(cfg.data.world))
    cache = Path(cfg.data.world_cache_dir)
    if not cache.is_absolute():
        cache = REPO / cache
    key = m0_cache_key(world.cfg)
    if (cache / f"m0-{key}" / "checkpoint" / "config.json").is_file():
        raise SystemExit(f"m0_curve: {cache / f'm0-{key}'} is already built: remove it to pretrain and probe again")
    families = world.cfg.families
    rows, t0 = [], time.perf_counter()

    def on_eval(steps: int, model, tokenizer_path: Path) -> dict:
        tok = load_tokenizer(tokenizer_path)
        r = probe_model(model, tok, chat=False, n=args.n, seed=args.seed, families=families)
        row = {k: round(acc, 1) for k, (acc, _) in r.items()}
        rows.append((steps, r))
        print(f"[curve] step {steps} ({time.perf_counter() - t0:.0f}s): "
              + "; ".join(f"{k} {acc:.1f}% of {cnt}" for k, (acc, cnt) in r.items()), flush=True)
        return row

    ckpt, _ = world.build_m0(cache, use_shipped=False, on_eval=on_eval, eval_every=args.every)
    print(f"\nM0 {ckpt} (key {key}), {time.perf_counter() - t0:.0f} s; probe of {args.n} reviews, "
          f"families {', '.join(families) if families else 'default'}:\n")
    answers = sorted({k for _, r in rows for k in r if k.startswith("answers: ")})
    present = [c for c in (*COLUMNS, *answers) if any(r.get(c, (0, 0))[1] for _, r in rows)]
    print("| step | " + " | ".join(f"{c} %" for c in present) + " |")
    print("|---|" + "---|" * len(present))
    for steps, r in rows:
        print(f"| {steps} | " + " | ".join(f"{r[c][0]:.1f} ({r[c][1]})" for c in present) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
