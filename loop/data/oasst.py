"""Open Assistant (oasst1) -> the loop's seed data: IFT, EFT candidates, held-out eval prompts.

Input: the public JSONL export, either message trees (`*.trees.jsonl`: one tree per line, the root
prompt under "prompt" with nested "replies") or flat messages (`*.messages.jsonl`: one message per
line with "parent_id"). As in the paper, only the first turn is used (root prompt + its direct
assistant replies), English only, deleted or review-rejected messages skipped.
- IFT: prompt + its human rank-0 reply.
- EFT candidates: other prompts with >= 2 ranked replies, every ranked reply with its rank (the
  EFT builder stage later adds the SFT baseline's judgments). Disjoint from IFT by prompt.
- eval prompts: English prompts in neither set.
The assignment of prompts to sets is a seeded shuffle, so it is reproducible.

CLI: python -m loop.data.oasst EXPORT.jsonl OUT_DIR [--ift N] [--eft-prompts N] [--eval N] [--seed S]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from ..records import RecordError, iter_jsonl, write_jsonl


def _usable(msg: dict, lang: str) -> bool:
    return (msg.get("lang") == lang and not msg.get("deleted", False)
            and msg.get("review_result", True) is not False and bool((msg.get("text") or "").strip()))


def _first_turns_from_trees(records: list[tuple[int, dict]], path) -> list[dict]:
    turns = []
    for lineno, tree in records:
        root = tree.get("prompt")
        if not isinstance(root, dict) or "message_id" not in root:
            raise RecordError(f"{path}:{lineno}: tree has no \"prompt\" message with a message_id")
        replies = [r for r in root.get("replies") or [] if isinstance(r, dict) and r.get("role") == "assistant"]
        if any("message_id" not in r for r in replies):
            raise RecordError(f"{path}:{lineno}: a reply of tree {root['message_id']!r} has no message_id")
        turns.append({"root": root, "replies": replies})
    return turns


def _first_turns_from_messages(records: list[tuple[int, dict]], path) -> list[dict]:
    roots, replies = {}, {}
    for lineno, msg in records:
        if "message_id" not in msg:
            raise RecordError(f"{path}:{lineno}: message has no message_id")
        if msg.get("parent_id") is None:
            roots[msg["message_id"]] = msg
        elif msg.get("role") == "assistant":
            replies.setdefault(msg["parent_id"], []).append(msg)
    return [{"root": root, "replies": replies.get(mid, [])} for mid, root in roots.items()]


def read_export(path: str | Path) -> list[dict]:
    """First turns of an oasst1 export: [{"root": prompt message, "replies": [assistant messages]}]."""
    path = Path(path)
    records = list(iter_jsonl(path))
    if not records:
        raise RecordError(f"{path}:0: empty export")
    is_trees = "message_tree_id" in records[0][1] and "prompt" in records[0][1]
    return (_first_turns_from_trees if is_trees else _first_turns_from_messages)(records, path)


def convert(turns: list[dict], *, ift_size: int, eft_prompts: int, eval_size: int, seed: int = 0,
            lang: str = "en") -> dict[str, list[dict]]:
    """Split first turns into {"ift", "eft_candidates", "eval_prompts"} record lists."""
    usable = []
    for t in turns:
        if not _usable(t["root"], lang) or t["root"].get("role", "prompter") != "prompter":
            continue
        ranked = [r for r in t["replies"] if _usable(r, lang) and r.get("rank") is not None]
        usable.append((t["root"], sorted(ranked, key=lambda r: (r["rank"], r["message_id"]))))
    usable.sort(key=lambda x: x[0]["message_id"])  # input order must not matter, only the seed
    random.Random(seed).shuffle(usable)
    ift, eft, held_out, used = [], [], [], set()
    # EFT needs several ranked replies and is the scarcer set, so it is filled from the shuffled
    # prompts first; IFT takes the rank-0 reply of the rest.
    eft_groups = 0
    for root, ranked in usable:
        if eft_groups < eft_prompts and len({r["rank"] for r in ranked}) >= 2:
            for r in ranked:
                eft.append({"id": r["message_id"], "group_id": root["message_id"], "prompt": root["text"].strip(),
                            "response": r["text"].strip(), "rank": int(r["rank"])})
            eft_groups += 1
            used.add(root["message_id"])
    for root, ranked in usable:
        if root["message_id"] in used:
            continue
        best = [r for r in ranked if r["rank"] == 0]
        if len(ift) < ift_size and best:
            ift.append({"id": root["message_id"], "prompt": root["text"].strip(), "response": best[0]["text"].strip()})
            used.add(root["message_id"])
        elif len(held_out) < eval_size:
            held_out.append({"id": root["message_id"], "prompt": root["text"].strip()})
            used.add(root["message_id"])
    return {"ift": ift, "eft_candidates": eft, "eval_prompts": held_out}


def write_seed(sets: dict[str, list[dict]], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {}
    for name, records in sets.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export")
    ap.add_argument("out_dir")
    ap.add_argument("--ift", type=int, default=3200)
    ap.add_argument("--eft-prompts", type=int, default=1000)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        # Everything is read and validated before the first write: a bad line leaves nothing behind.
        sets = convert(read_export(args.export), ift_size=args.ift, eft_prompts=args.eft_prompts,
                       eval_size=args.eval, seed=args.seed)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    paths = write_seed(sets, args.out_dir)
    for name, p in paths.items():
        print(f"{name}: {len(sets[name])} records -> {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
