"""Digest of the records a run wrote, to check that a change kept behaviour: prompts, responses, judgments,
scores, pairs and outcomes of every iteration, the seed data, and every model's eval generations and grades.

    python scripts/records_digest.py RUN_DIR              # one line per record file: sha256, lines, path
    python scripts/records_digest.py RUN_DIR OTHER_DIR    # exit 1 and name every file that differs

Only record files are compared (not done.json summaries, which hold timings, nor weights, which the
records already pin down through everything generated after them).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

PATTERNS = ("seed/*.jsonl", "eft/*.jsonl", "iter_*/[1-4]_*/*.jsonl", "eval/*/generations.jsonl",
            "eval/*/grades.jsonl", "eval/*/rm_judgments.jsonl", "eval/*/pairwise_*.jsonl")


def digest(run_dir: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for pattern in PATTERNS:
        for f in sorted(run_dir.glob(pattern)):
            if ".partial" in f.parent.name:
                continue
            data = f.read_bytes()
            out[str(f.relative_to(run_dir))] = (hashlib.sha256(data).hexdigest()[:16], data.count(b"\n"))
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or not all(Path(a).is_dir() for a in argv):
        print("usage: records_digest.py RUN_DIR [OTHER_RUN_DIR]", file=sys.stderr)
        return 2
    a = digest(Path(argv[0]))
    if not a:
        print(f"{argv[0]}: no record files", file=sys.stderr)
        return 2
    if len(argv) == 1:
        for path, (h, n) in a.items():
            print(f"{h}  {n:7d}  {path}")
        return 0
    b = digest(Path(argv[1]))
    differ = [p for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
    for p in differ:
        print(f"differs: {p}  {a.get(p)}  vs  {b.get(p)}")
    print(f"{len(a)} vs {len(b)} record files, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
