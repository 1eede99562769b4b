"""Can a world model read numbers off its context? Teacher-forced accuracy on fresh reviews (issue #13).

  python bench/copy_probe.py .cache/world/m0-<key>/checkpoint            # M0, the corpus's review format
  python bench/copy_probe.py runs/cpu_default/models/M1 --chat           # M1, the world judge prompt

A review spells out each check with the numbers it checks ("numbers: yes. count 1: yes. 45 < 49 < 56: yes.
49 is even: no. Score: 3"). On `--n` reviews of fresh tasks (seeded, with candidates of every grade, as the
seed builder draws them) the model reads the whole review teacher-forced, and its argmax at each token is
compared with the review's:
- copied numbers: number pieces that already occur in the task or the response (the judge must copy them);
- other numbers: computed ones (a sum, a count);
- with `--families pick_labeled`: looked-up labels (the label after the number in "31 blue , want red", read off
  the task's list) and asked labels (the one after "want", copied from the question);
- with families that have drills (pick_labeled, pick_missing): the labels and verdicts of fresh drill documents,
  where each looked-up number occurs once before (no distractor in context);
- verdicts: the "yes" / "no" after each check (and, within them, the "no" of the failed check alone: always
  answering "yes" scores ~75% of all verdicts but 0% of these), and the score after "Score:";
- answers (corpus format only): the generator's side, the greedy answer after "Task: ...\nAnswer:" on fresh
  tasks, right by the grader, per family ("answers: pick_labeled").
Greedy judging fails where the copy fails, so the first number says most. Prints one line per model.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_NUMBER = re.compile(r"\d+")


def reviews(n: int, seed: int, families: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
    """(task text, response, grader's review) for n fresh tasks."""
    from loop.world.grader import justification_for
    from loop.world.seed import candidates_by_score
    from loop.world.tasks import sample_task

    rng = random.Random(f"copy-probe-{seed}")
    out = []
    for _ in range(n):
        task = sample_task(rng, families)
        by_score = candidates_by_score(task, rng, tries=6)
        response = rng.choice(by_score[rng.choice(sorted(by_score))])
        out.append((task.text, response, justification_for(task, response)[1]))
    return out


def probe(model_dir: Path, chat: bool, n: int, seed: int, families: tuple[str, ...] | None = None) -> dict:
    from model.checkpoint import load_pretrained
    from model.tokenizer import load_tokenizer

    model = load_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir / "tokenizer.model", chat_template="llama2" if chat else None)
    return probe_model(model, tok, chat, n, seed, families)


def probe_model(model, tok, chat: bool, n: int, seed: int, families: tuple[str, ...] | None = None) -> dict:
    """{kind: (accuracy %, count)} of `model` (in eval mode) with tokenizer `tok` over n fresh reviews."""
    import torch

    from loop.judge import fill_template
    from loop.prompts import chat_ids
    from loop.world import World

    template = World.judge_template_path.read_text(encoding="utf-8").rstrip("\n")
    score_id, verdict_ids = tok.token_id("▁Score"), {tok.token_id("▁yes"), tok.token_id("▁no")}
    no_id = tok.token_id("▁no")
    from loop.world.tasks import LABELS

    label_ids = {tok.token_id("▁" + w) for w in LABELS}
    hits = {k: [0, 0] for k in ("copied numbers", "other numbers", "looked-up labels", "asked labels", "verdicts",
                                "'no' verdicts", "score")}
    for task, response, review in reviews(n, seed, families):
        if chat:
            prefix = chat_ids(tok, fill_template(template, task, response))
        else:
            prefix = tok.encode(f"Task: {task}\nResponse: {response}\nReview:", bos=True, eos=False)
        body = tok.encode(" " + review, bos=False, eos=False)
        with torch.no_grad():
            pred = model(torch.tensor([prefix + body]))[0].argmax(-1).tolist()
        seen = set(prefix)
        for i, t in enumerate(body):
            if i >= 2 and body[i - 2] == score_id:
                kind = "score"
            elif t in verdict_ids:
                kind = "verdicts"
            elif t in label_ids:
                # pick_labeled's goal check "31 blue , want red": the label after the number is looked up in the
                # task's list (the skill its judge needs); the one after "want" is copied from the question
                kind = "looked-up labels" if i > 0 and _NUMBER.fullmatch(tok.decode([body[i - 1]]).strip()) else \
                    "asked labels"
            elif _NUMBER.fullmatch(tok.decode([t]).strip()):
                kind = "copied numbers" if t in seen else "other numbers"
            else:
                continue
            right = pred[len(prefix) + i - 1] == t
            hits[kind][0] += right
            hits[kind][1] += 1
            if t == no_id and kind == "verdicts":
                hits["'no' verdicts"][0] += right
                hits["'no' verdicts"][1] += 1
    if not chat:  # the corpus's own drills: is the lookup learned where nothing else in context competes?
        hits.update(probe_drills(model, tok, n, seed, families, label_ids, verdict_ids))
        hits.update(probe_answers(model, tok, n, seed, families))
    return {k: (100.0 * h / m if m else float("nan"), m) for k, (h, m) in hits.items()}


def probe_drills(model, tok, n: int, seed: int, families, label_ids: set[int], verdict_ids: set[int]) -> dict:
    """[right, count] of the labels a drill looks up ("List: 12 red , 31 blue\nLookups: 31 blue. 12 red.": each
    number occurs once before, so the label is one induction step away) and of its membership verdicts
    ("31 not in second list: yes"), over up to n fresh drills of the families that have them."""
    import torch

    from loop.world.tasks import FAMILIES

    rng = random.Random(f"copy-probe-drills-{seed}")
    drilled = [FAMILIES[f] for f in (families or ()) if FAMILIES[f].drill(random.Random(0)) is not None]
    if not drilled:
        return {}
    hits = {"drill labels": [0, 0], "drill verdicts": [0, 0]}
    for _ in range(n):
        ids = tok.encode(rng.choice(drilled).drill(rng), bos=True, eos=False)
        with torch.no_grad():
            pred = model(torch.tensor([ids]))[0].argmax(-1).tolist()
        start = ids.index(tok.token_id("\n")) if tok.token_id("\n") in ids else 0  # the lookups follow the list
        for i in range(max(start, 1), len(ids)):
            t = ids[i]
            if t in label_ids and _NUMBER.fullmatch(tok.decode([ids[i - 1]]).strip()):
                kind = "drill labels"
            elif t in verdict_ids:
                kind = "drill verdicts"
            else:
                continue
            hits[kind][0] += pred[i - 1] == t
            hits[kind][1] += 1
    return hits


def probe_answers(model, tok, n: int, seed: int, families, max_tokens: int = 6) -> dict:
    """[right, count] of greedy answers to n fresh tasks in the corpus's QA format ("Task: ...\nAnswer:"), by
    the grader, per family: can M0 do the operation the answer needs (not only the one its check needs)?"""
    import torch

    from loop.world.grader import grade
    from loop.world.tasks import sample_task

    rng = random.Random(f"copy-probe-answers-{seed}")
    stop = {tok.token_id("\n"), tok.eos_id}
    hits: dict[str, list[int]] = {}
    for _ in range(n):
        task = sample_task(rng, families)
        ids = tok.encode(f"Task: {task.text}\nAnswer:", bos=True, eos=False)
        out: list[int] = []
        with torch.no_grad():
            for _ in range(max_tokens):
                t = int(model(torch.tensor([ids + out]))[0, -1].argmax())
                if t in stop:
                    break
                out.append(t)
        h = hits.setdefault(f"answers: {task.family}", [0, 0])
        h[0] += grade(task.text, tok.decode(out).strip()).correct
        h[1] += 1
    return dict(sorted(hits.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="HF checkpoint dirs holding tokenizer.model")
    ap.add_argument("--chat", action="store_true", help="the world judge prompt in the chat template (SFT models)")
    ap.add_argument("--n", type=int, default=300, help="fresh reviews")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="+", default=None, help="task families (default: the default world's)")
    args = ap.parse_args(argv)
    for m in args.models:
        r = probe(m, args.chat, args.n, args.seed, tuple(args.families) if args.families else None)
        print(f"{m}: " + "; ".join(f"{k} {acc:.1f}% of {cnt}" for k, (acc, cnt) in r.items()))


if __name__ == "__main__":
    main()
