"""OASST converter (trees and flat messages) and the EFT builder's selection on fixtures."""
import json
import pathlib
import random

from loop.data.oasst import convert, main, read_export
from loop.stage_eft import select_eft
from loop.records import read_jsonl

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "oasst_tiny.jsonl"


def _split(path=FIXTURE, seed=0):
    return convert(read_export(path), ift_size=4, eft_prompts=3, eval_size=3, seed=seed)


def test_trees_split():
    sets = _split()
    ift, eft, ev = sets["ift"], sets["eft_candidates"], sets["eval_prompts"]
    assert len(ift) == 4 and len(ev) == 3 and len({e["group_id"] for e in eft}) == 3
    prompt_ids = [{r["id"] for r in ift}, {e["group_id"] for e in eft}, {r["id"] for r in ev}]
    assert not (prompt_ids[0] & prompt_ids[1]) and not (prompt_ids[0] & prompt_ids[2]) and not (prompt_ids[1] & prompt_ids[2])
    excluded = {"t9-p", "t10-p"}  # German, deleted
    assert not excluded & set().union(*prompt_ids)
    for r in ift:  # the human rank-0 reply of the first turn
        assert r["response"].startswith("Answer 0") or r["response"].startswith("Rain taps")
    for e in eft:
        assert e["id"] not in {"t11-a0", "t11-a3"}  # deleted / failed review
        assert "Follow-up" not in e["response"]  # first turn only
    groups = {}
    for e in eft:
        groups.setdefault(e["group_id"], []).append(e["rank"])
    assert all(len(set(r)) >= 2 for r in groups.values())


def test_deterministic_and_order_independent(tmp_path):
    lines = FIXTURE.read_text().splitlines()
    random.Random(1).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    assert _split() == _split(shuffled)
    assert _split(seed=0) != _split(seed=5)


def test_flat_messages_format(tmp_path):
    flat = tmp_path / "messages.jsonl"
    with open(flat, "w") as f:
        def walk(m, tree_id):
            row = {k: v for k, v in m.items() if k != "replies"}
            row["message_tree_id"] = tree_id
            f.write(json.dumps(row) + "\n")
            for r in m.get("replies", []):
                walk(r, tree_id)
        for line in FIXTURE.read_text().splitlines():
            tree = json.loads(line)
            walk(tree["prompt"], tree["message_tree_id"])
    assert _split(flat) == _split()


def test_cli_writes_seed_files(tmp_path):
    assert main([str(FIXTURE), str(tmp_path / "seed"), "--ift", "4", "--eft-prompts", "3", "--eval", "3"]) == 0
    assert len(read_jsonl(tmp_path / "seed" / "ift.jsonl", ("id", "prompt", "response"))) == 4
    assert len(read_jsonl(tmp_path / "seed" / "eft_candidates.jsonl", ("id", "group_id", "rank"))) >= 6


def _cands(n_groups, size=3):
    return [{"id": f"g{g}-{r}", "group_id": f"g{g}", "prompt": f"p{g}", "response": f"r{r}", "rank": r}
            for g in range(n_groups) for r in range(size)]


def test_eft_selection_agreement_and_downsampling():
    cands = _cands(10)
    judg = {}
    for c in cands:
        g = int(c["group_id"][1:])
        if g < 6:    # agrees with humans: rank 0 -> 4, 1 -> 3, 2 -> 2... groups 0-1 all-4 ties below
            score = [4.0, 3.0, 2.0][c["rank"]]
        elif g < 8:  # disagrees (inverted)
            score = [1.0, 2.0, 3.0][c["rank"]]
        else:        # unparsable for two of three
            score = None if c["rank"] else 4.0
        judg[c["id"]] = {"judgment": f"... Score: {score}", "score": score}
    train, evals, st = select_eft(cands, judg, eval_fraction=0.2, seed=0, cap_ratio=1.0)
    eval_groups = {e["group_id"] for e in evals}
    assert len(eval_groups) == 2 and len(evals) == 6  # eval groups whole and unfiltered
    assert not eval_groups & {t["group_id"] for t in train}
    assert st["train_groups"] == 8
    train_groups = {f"g{g}" for g in range(10)} - eval_groups
    assert st["groups_disagreeing"] == len(train_groups & {"g6", "g7"})
    assert st["groups_too_few_scored"] == len(train_groups & {"g8", "g9"})
    agreeing = len(train_groups & {f"g{g}" for g in range(6)})
    assert {t["group_id"] for t in train} == train_groups & {f"g{g}" for g in range(6)}
    assert len(train) == 3 * agreeing  # scores 4/3/2 once each per agreeing group: nothing to down-sample
    assert all(judg[t["id"]]["score"] == t["score"] and t["judgment"] for t in train)
    # now make 4 the dominant score: 4,4 above 2 in agreeing groups (humans tie ranks 0 and 1)
    cands2 = [dict(c, rank=0 if c["rank"] < 2 else 1) for c in cands]
    judg2 = {c["id"]: {"judgment": "j", "score": 4.0 if c["rank"] == 0 else 2.0} for c in cands2}
    train2, _, st2 = select_eft(cands2, judg2, eval_fraction=0.2, seed=0, cap_ratio=1.0)
    counts = st2["train_score_counts"]
    assert counts["4"] == counts["2"] == 8 and st2["downsampled_most_common"] == 8
