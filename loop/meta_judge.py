"""Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594): the model judges its own judgments.

Stage 3m of an iteration (only when meta.enabled). A response whose K judgments disagree (two
different parsed scores) gets pairs of its parsed judgments compared by the same model with
templates/meta_judge.txt, once with each judgment shown first. A comparison has a winner only when
both orders pick the same judgment; anything else (the orders disagree, a verdict is unparsable, a
prompt does not fit the context) is a tie, so a meta-judge that always picks the first judgment
yields only ties. Each judgment's wins and losses over its comparisons rank it: the judge
preference pair of the response is (its judge prompt, the judgment with the most wins, the one with
the fewest); a response whose comparisons all tied, or whose best and worst judgments won equally
often, gives none, with that reason. loop/pairs.py mixes the judge pairs into DPO's pairs.

`parse_winner` is as strict as the score parser: the judgment must hold exactly one "Winner:" and
end with it, as "Winner: Judgement A" or "Winner: Judgement B"; anything else is no winner,
counted, never coerced into a verdict.

In judge.mode=expected a judgment's text stops before "Score:" (the score is read from the judge's
distribution after it): the meta-judge is shown the text with its expected score written after it,
and a judge pair trains the justification alone, without a stop token, since the score follows it.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

from engine.distributed import Dist, log
from engine.sampler import SamplingParams

from .config import LoopConfig
from .generation import generate_records, read_skipped
from .judge import INSTRUCTION_SLOT, RESPONSE_SLOT, fill_template
from .prompts import chat_ids
from .records import read_jsonl, stable_seed, write_jsonl
from .stages import DONE, META_JUDGE, PAIRS, F, iteration_dir, iteration_of

STAGE = META_JUDGE.name
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
RUBRIC_SLOT, A_SLOT, B_SLOT = "<RUBRIC_HERE>", "<JUDGEMENT_A_HERE>", "<JUDGEMENT_B_HERE>"
REQUIRED_SLOTS = (INSTRUCTION_SLOT, RESPONSE_SLOT, A_SLOT, B_SLOT)  # the rubric may be written into the template
ORDERS = ("ab", "ba")  # "ab": the judgment with the lower sample index is shown as Judgement A

DROP_NO_WINNER = "no_winner"  # every comparison of the response tied
DROP_TIED_WINS = "tied_wins"  # decisive comparisons, yet the best and worst judgments won equally often (a cycle)
TIE_TOO_LONG, TIE_NO_VERDICT, TIE_ORDERS_DISAGREE = "too_long", "no_verdict", "orders_disagree"

_WINNER_WORD_RE = re.compile(r"winner\s*[:：]", re.IGNORECASE)
# From the one "Winner:" to the end of the text: optional markdown bold or brackets around the verdict
# and closing punctuation after it, nothing else.
_WINNER_RE = re.compile(r"winner\s*[:：]\s*[*\[\"“]*\s*judge?ment\s+([AB])\s*[*\]\"”]*\s*[.!]?[*\"”]*\s*\Z",
                        re.IGNORECASE)


def parse_winner(text: str | None) -> str | None:
    """"A" or "B" when the text ends with its only "Winner: Judgement A|B", else None."""
    markers = list(_WINNER_WORD_RE.finditer(text or ""))
    if len(markers) != 1:
        return None
    m = _WINNER_RE.match(text, markers[0].start())
    return m.group(1).upper() if m else None


def meta_template_path(name: str, world=None) -> Path:
    """meta.template's file: "world" (world: a loop.world.World), a path, or a file in loop/templates."""
    if name == "world":
        return world.meta_template_path
    return Path(name) if Path(name).is_file() else TEMPLATES_DIR / str(name)


def load_meta_template(path: str | Path) -> str:
    """The template at `path` (meta_template_path), holding the instruction, response and both judgment slots."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    for slot in REQUIRED_SLOTS:
        if slot not in text:
            raise ValueError(f"{path}:1: meta-judge template has no {slot} slot")
    return text.rstrip("\n")


def rubric_of(judge_template: str) -> str:
    """The judge template without the lines that carry the instruction and the response: its criteria
    and the output format the judgments were asked for (whatever the template's layout)."""
    lines = [ln for ln in judge_template.splitlines() if INSTRUCTION_SLOT not in ln and RESPONSE_SLOT not in ln]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def fill_meta(template: str, rubric: str, instruction: str, response: str, first: str, second: str) -> str:
    # One pass, so text that itself contains a slot name is never substituted into.
    values = {RUBRIC_SLOT: rubric, INSTRUCTION_SLOT: instruction, RESPONSE_SLOT: response, A_SLOT: first,
              B_SLOT: second}
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], template)


def _expected(judgment: dict) -> bool:
    return judgment.get("score_mode") == "expected"


def shown_judgment(judgment: dict) -> str:
    """The judgment as the meta-judge reads it (an expected-mode one with its score written out)."""
    if _expected(judgment):
        return f"{judgment['text'].rstrip()} Score: {judgment['score']:.2f}"
    return judgment["text"]


def plan_comparisons(responses: list[dict], judgments: list[dict], max_per_response: int) -> tuple[list[dict], Counter]:
    """(comparisons [{"target_id", "a", "b"}], counts of responses by why they are or are not compared).

    Only parsed judgments take part; a response is compared when they hold two different scores. Pairs
    of judgments with different scores come first (they are what the disagreement is about), then by
    sample index; at most max_per_response pairs per response, each later run in both orders."""
    by_target: dict[str, list[dict]] = {}
    for j in judgments:
        by_target.setdefault(j["target_id"], []).append(j)
    plan, counts = [], Counter()
    for r in responses:
        parsed = sorted((j for j in by_target.get(r["id"], []) if j["score"] is not None),
                        key=lambda j: j["sample_index"])
        if len(parsed) < 2:
            counts["too_few_parsed"] += 1
        elif len({j["score"] for j in parsed}) < 2:
            counts["agreeing"] += 1
        else:
            counts["disagreeing"] += 1
            pairs = sorted(itertools.combinations(parsed, 2), key=lambda ab: ab[0]["score"] == ab[1]["score"])
            plan += [{"target_id": r["id"], "a": a, "b": b} for a, b in pairs[:max_per_response]]
    return plan, counts


def comparison_id(comparison: dict, order: str) -> str:
    return f"{comparison['target_id']}-j{comparison['a']['sample_index']}j{comparison['b']['sample_index']}-{order}"


def preferred(comparison: dict, record: dict | None, order: str) -> str | None:
    """The judgment id one order's verdict picks; None without a parsed verdict."""
    if record is None or record.get("verdict") not in ("A", "B"):
        return None
    first, second = (comparison["a"], comparison["b"]) if order == "ab" else (comparison["b"], comparison["a"])
    return (first if record["verdict"] == "A" else second)["id"]


def decide(comparison: dict, records: dict[str, dict]) -> tuple[str | None, str | None]:
    """(winning judgment id or None, tie reason or None) from the records of both orders (absent = too long)."""
    got = {o: records.get(comparison_id(comparison, o)) for o in ORDERS}
    picks = [preferred(comparison, got[o], o) for o in ORDERS]
    if picks[0] is not None and picks[0] == picks[1]:
        return picks[0], None
    if any(rec is None for rec in got.values()):
        return None, TIE_TOO_LONG
    return None, TIE_NO_VERDICT if None in picks else TIE_ORDERS_DISAGREE


def build_judge_pairs(plan: list[dict], winners: list[str | None], judge_prompt: dict[str, str]
                      ) -> tuple[list[dict], list[dict], Counter]:
    """(judge pairs, one outcome per compared response, drop reason counts) from the decided comparisons.

    judge_prompt: response id -> the judge prompt its judgments answered (the DPO prompt side)."""
    by_target: dict[str, list[tuple[dict, str | None]]] = {}
    for c, w in zip(plan, winners):
        by_target.setdefault(c["target_id"], []).append((c, w))
    pairs, outcomes, reasons = [], [], Counter()
    for target, comps in by_target.items():
        judged = {j["id"]: j for c, _ in comps for j in (c["a"], c["b"])}
        wins, losses = Counter(), Counter()
        for c, w in comps:
            if w is not None:
                wins[w] += 1
                losses[c["b"]["id"] if w == c["a"]["id"] else c["a"]["id"]] += 1
        idx = {jid: j["sample_index"] for jid, j in judged.items()}
        chosen = min(judged, key=lambda j: (-wins[j], losses[j], idx[j]))
        rejected = min(judged, key=lambda j: (wins[j], -losses[j], -idx[j]))
        decisive = sum(w is not None for _, w in comps)
        reason = DROP_NO_WINNER if not decisive else DROP_TIED_WINS if wins[chosen] == wins[rejected] else None
        outcomes.append({"id": target, "comparisons": len(comps), "decisive": decisive, "dropped": reason,
                         "judgments": {jid: {"score": j["score"], "wins": wins[jid], "losses": losses[jid]}
                                       for jid, j in judged.items()}})
        if reason:
            reasons[reason] += 1
            continue
        c, r = judged[chosen], judged[rejected]
        pairs.append({"id": f"{target}-judge", "prompt": judge_prompt[target],
                      "chosen": c["text"], "rejected": r["text"], "chosen_id": c["id"], "rejected_id": r["id"],
                      "chosen_score": c["score"], "rejected_score": r["score"],
                      "chosen_finished": c.get("finish_reason") == "stop" and not _expected(c),
                      "rejected_finished": r.get("finish_reason") == "stop" and not _expected(r),
                      "kind": "judge", "target_id": target, "chosen_wins": wins[chosen],
                      "rejected_wins": wins[rejected]})
    return pairs, outcomes, reasons


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def sft_records(eft: list[dict], *, template: str, judge_template: str, n: int, seed: int) -> list[dict]:
    """Up to n meta-judge SFT examples {"id", "prompt", "response"} from EFT records (docs/DATA.md).

    Each takes an EFT response with its judgment (the right one) and the judgment of another response of
    its group that scored differently (wrong about this response: it checks other numbers, or concludes
    another score); they are shown in a random order, in meta prompt `template`. The target is the right
    judgment written out, then its letter: the meta-judge reviews the response itself, then names the
    judgment that agrees. Deterministic for (records, seed); at most one example per EFT response."""
    rubric = rubric_of(judge_template)
    groups: dict[str, list[dict]] = {}
    for r in eft:
        groups.setdefault(r["group_id"], []).append(r)
    usable = [(r, [o for o in groups[gid] if o["score"] != r["score"]]) for gid in sorted(groups) for r in groups[gid]]
    usable = [(r, others) for r, others in usable if others]
    rng = random.Random(f"meta-sft-{seed}")
    rng.shuffle(usable)
    out = []
    for r, others in usable[:n]:
        wrong = rng.choice(others)["judgment"]
        right_first = rng.random() < 0.5
        a, b = (r["judgment"], wrong) if right_first else (wrong, r["judgment"])
        out.append({"id": f"meta-{r['id']}", "prompt": fill_meta(template, rubric, r["prompt"], r["response"], a, b),
                    "response": f"{r['judgment'].rstrip()}\nWinner: Judgement {'A' if right_first else 'B'}"})
    return out


def meta_judge(sampler, tok, dist: Dist, cfg: LoopConfig, *, judge_template: str, meta_template: str,
               prompts_path: Path, responses_path: Path, judgments_path: Path, work: Path, iteration: int,
               chunk_hook=None) -> dict:
    """(3m) work/comparisons.jsonl (the meta-judge's generations, both orders), work/judge_pairs.jsonl,
    work/judge_outcomes.jsonl (every compared response: wins, losses, drop reason); returns the summary.
    meta_template: the loaded meta-judge prompt (load_meta_template)."""
    mc = cfg.meta
    rubric = rubric_of(judge_template)
    prompt_text = {p["id"]: p["prompt"] for p in read_jsonl(prompts_path, ("id", "prompt"))}
    responses = read_jsonl(responses_path, ("id", "prompt_id", "text"))
    judgments = read_jsonl(judgments_path, ("id", "target_id", "sample_index", "text", "score"))
    plan, counts = plan_comparisons(responses, judgments, mc.max_comparisons)
    response = {r["id"]: r for r in responses}
    requests = []
    for c in plan:
        r = response[c["target_id"]]
        for order in ORDERS:
            first, second = (c["a"], c["b"]) if order == "ab" else (c["b"], c["a"])
            text = fill_meta(meta_template, rubric, prompt_text[r["prompt_id"]], r["text"], shown_judgment(first),
                             shown_judgment(second))
            rid = comparison_id(c, order)
            seed = stable_seed(cfg.run.seed, "meta_judge", rid)
            requests.append({"id": rid, "ids": chat_ids(tok, text), "seed": seed,
                             "target_id": c["target_id"], "a_id": c["a"]["id"], "b_id": c["b"]["id"], "order": order})
    params = SamplingParams(temperature=mc.temperature, top_p=mc.top_p, max_new_tokens=mc.max_new_tokens,
                            stop_token_ids=tuple(tok.stop_ids))

    def record(req, c, rid):
        return {"id": rid, "target_id": req["target_id"], "a_id": req["a_id"], "b_id": req["b_id"],
                "order": req["order"], "text": c.text, "num_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason, "verdict": parse_winner(c.text)}

    out_path = work / F.COMPARISONS
    made = generate_records(sampler, dist, requests, params, out_path, chunk_size=cfg.run.chunk_size,
                            make_record=record, desc=f"iter {iteration}: meta-judge", chunk_hook=chunk_hook)
    if not dist.is_main:
        return {}
    write_jsonl(out_path, made)  # request order, whatever order a resumed run appended in
    by_id = {m["id"]: m for m in made}
    decided = [decide(c, by_id) for c in plan]
    judge_prompt = {t: fill_template(judge_template, prompt_text[response[t]["prompt_id"]], response[t]["text"])
                    for t in {c["target_id"] for c in plan}}
    pairs, outcomes, dropped = build_judge_pairs(plan, [w for w, _ in decided], judge_prompt)
    write_jsonl(work / F.JUDGE_PAIRS, pairs)
    write_jsonl(work / F.JUDGE_OUTCOMES, outcomes)
    verdicts = [m["verdict"] for m in made]
    parsed = [v for v in verdicts if v is not None]
    both = sum(all(by_id.get(comparison_id(c, o), {}).get("verdict") for o in ORDERS) for c in plan)
    summary = {
        "responses": len(responses), "responses_compared": counts["disagreeing"],
        "not_compared": {k: counts[k] for k in ("agreeing", "too_few_parsed") if counts[k]},
        "comparisons": len(plan), "generations": len(made), "too_long": len(read_skipped(out_path)),
        "parsed": len(parsed), "parse_rate": len(parsed) / len(made) if made else None,
        "both_orders_parsed_rate": both / len(plan) if plan else None,
        # share of parsed verdicts naming the judgment shown first: 0.5 = no position bias
        "first_position_rate": sum(v == "A" for v in parsed) / len(parsed) if parsed else None,
        "winners": sum(w is not None for w, _ in decided),
        "ties": sum(w is None for w, _ in decided),
        "tie_reasons": dict(sorted(Counter(why for _, why in decided if why).items())),
        "judge_pairs": len(pairs), "dropped": dict(sorted(dropped.items())),
        "judge_share": mc.judge_share,
        "mean_chosen_score": _mean([p["chosen_score"] for p in pairs]),
        "mean_rejected_score": _mean([p["rejected_score"] for p in pairs]),
        # how often the meta-judge sides with the higher score: near 1 feeds the judge's drift toward 5
        "chosen_higher_score_frac": _mean([float(p["chosen_score"] > p["rejected_score"]) for p in pairs]),
    }
    log(dist, f"iter {iteration} meta-judge: {len(plan)} comparisons, parse rate {summary['parse_rate']}, "
              f"{summary['winners']} winners, {len(pairs)} judge pairs")
    return summary


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _reasons(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


def report_lines(run_dir: Path) -> list[str]:
    """Markdown for the report: per iteration, the meta-judge's comparisons, parse rate (both orders),
    winners and ties, judge pairs built, dropped by reason, and the share of DPO's pairs they took.
    [] when no iteration ran the meta-judge."""
    iters = sorted((p for p in Path(run_dir).glob(iteration_dir("*")) if iteration_of(p.name) is not None),
                   key=lambda p: iteration_of(p.name))
    rows = []
    for it in iters:
        done = it / STAGE / DONE
        if not done.exists():
            continue
        s = json.loads(done.read_text(encoding="utf-8"))
        pairs_done = it / PAIRS.name / DONE
        mix = json.loads(pairs_done.read_text(encoding="utf-8")).get("meta", {}) if pairs_done.exists() else {}
        dropped = dict(s.get("dropped", {}))
        if mix.get("judge_pairs_over_share"):
            dropped["over_share"] = mix["judge_pairs_over_share"]
        used = (f"{mix['judge_pairs_used']} of {mix['total_pairs']} ({_fmt(mix['judge_share_used'])}, "
                f"target {_fmt(mix['judge_share_target'], 'g')})" if mix else f"- ({PAIRS.name} not done)")
        rows.append(f"| {iteration_of(it.name)} | {s['responses_compared']} / {s['responses']} | {s['comparisons']} | "
                    f"{_fmt(s['parse_rate'])} / {_fmt(s['both_orders_parsed_rate'])} | "
                    f"{_fmt(s['first_position_rate'])} | {s['winners']} | {s['ties']} ({_reasons(s['tie_reasons'])}) | "
                    f"{s['judge_pairs']} | {_reasons(dropped)} | {used} |")
    if not rows:
        return []
    return ["## Meta-judge (judge preference pairs)", "",
            "Responses whose judgments disagree get pairs of judgments compared in both orders; a comparison has a "
            "winner only when both orders agree. Parse rate: per generation / both orders of a comparison.", "",
            "| iteration | responses compared | comparisons | parse rate | first-position rate | winners | ties | "
            "judge pairs | dropped | judge pairs in DPO |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
