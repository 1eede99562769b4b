"""The user's own data -> the loop's seed records: IFT, EFT and eval prompts from JSONL or a HF dataset.

`data.source: jsonl` reads JSONL files; `data.source: hf` reads a `datasets` directory written by
`save_to_disk` or a `.parquet` file (the `datasets` package, imported only then). One path per split:
`data.ift_path`, `data.eft_path` (optional), `data.eft_eval_path` (optional), `data.eval_path`.

Row shapes (README "Your own data"):
- conversational: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}: the first user
  turn and the reply after it (first turn only, as the paper); a system turn is an error, since the
  loop's prompts are one user turn and dropping it would change the data silently.
- prompt/completion: strings, or TRL's conversational form where "prompt" is [one user message] and
  "completion" [one assistant message]. "instruction" is read for "prompt" (AlpacaEval) and
  "response" for "completion" (the seed files' own shape).
EFT rows are either of these with the judge prompt (judge.template filled in) as the user turn and the
judgment as the reply, or flat {"prompt" | "instruction", "response", "judgment" and/or "score",
"group_id"?, "rank"?}. Every judgment must end in a "Score: n" that loop.judge.parse_score reads.
Everything is read and checked before anything is written; a bad row is a RecordError naming file:line
(JSONL) or "file row i" (datasets) and the field.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Iterator

from ..judge import INSTRUCTION_SLOT, RESPONSE_SLOT, parse_score
from ..records import RecordError, iter_jsonl
from ..world.seed import dense_ranks

PIP_HINT = "pip install -e .[data]"


# --- reading rows -------------------------------------------------------------------------------
def _hf_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise RecordError(f"{path}: data.source = hf needs the datasets package: {PIP_HINT}") from None
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise RecordError(f"{path}: not a dataset written by save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = ", ".join(f"{path / s}" for s in ds)
            raise RecordError(f"{path}: a DatasetDict; point the path at one of its splits: {splits}")
        return ds
    if path.suffix == ".parquet":
        try:
            return datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow's errors share no base class with ours
            raise RecordError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from None
    raise RecordError(f"{path}: not a save_to_disk directory or a .parquet file")


def iter_rows(path: str | Path, source: str) -> Iterator[tuple[str, int, dict]]:
    """(where, number, row): where is "file:line" (JSONL, number = line) or "file row i" (datasets, number = i)."""
    path = Path(path)
    n = 0
    if source == "jsonl":
        for lineno, row in iter_jsonl(path):
            n += 1
            yield f"{path}:{lineno}", lineno, row
    elif source == "hf":
        for i, row in enumerate(_hf_dataset(path)):
            n += 1
            # a table has every column in every row: a field a row lacks is None there, as if absent in JSONL
            yield f"{path} row {i}", i, {k: v for k, v in row.items() if v is not None}
    else:
        raise ValueError(f"unknown data source {source!r}")
    if n == 0:
        raise RecordError(f"{path}{':0' if source == 'jsonl' else ''}: no rows")


# --- one row -> (user text, reply text) ------------------------------------------------------------
def _text(where: str, field: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: {field} must be a non-empty string, got {value!r:.60}")
    return value


def _message(where: str, field: str, msg, role: str) -> str:
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise RecordError(f"{where}: {field} must be a message {{\"role\", \"content\"}}")
    if msg["role"] != role:
        why = ("the loop's prompts are one user turn: drop the system turn or fold it into the user's"
               if msg["role"] == "system" else f"expected the {role} turn")
        raise RecordError(f"{where}: {field} has role {msg['role']!r}: {why}")
    return _text(where, f"{field}.content", msg["content"])


def _one_message(where: str, field: str, value, role: str) -> str:
    if isinstance(value, str):
        return _text(where, field, value)
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: {field} must be a string or a list of messages")
    if len(value) != 1:
        if isinstance(value[0], dict) and value[0].get("role") == "system":
            _message(where, f"{field}[0]", value[0], role)  # raises the system-turn error, which says what to do
        raise RecordError(f"{where}: {field} has {len(value)} messages: expected one {role} turn")
    return _message(where, f"{field}[0]", value[0], role)


def turn(where: str, row: dict, need_reply: bool) -> tuple[str, str | None]:
    """(user text, assistant reply or None) of a conversational or prompt/completion row."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError(f"{where}: messages must be a non-empty list")
        user = _message(where, "messages[0]", msgs[0], "user")
        if not need_reply:
            return user, None
        if len(msgs) < 2:
            raise RecordError(f"{where}: messages has no assistant turn after the user turn")
        return user, _message(where, "messages[1]", msgs[1], "assistant")
    key = next((k for k in ("prompt", "instruction") if k in row), None)
    if key is None:
        raise RecordError(f"{where}: missing field messages (or prompt / instruction)")
    user = _one_message(where, key, row[key], "user")
    if not need_reply:
        return user, None
    reply_key = next((k for k in ("completion", "response") if k in row), None)
    if reply_key is None:
        raise RecordError(f"{where}: missing field completion (or response)")
    return user, _one_message(where, reply_key, row[reply_key], "assistant")


def _row_id(where: str, row: dict, default: str, seen: dict[str, str]) -> str:
    rid = str(row["id"]) if row.get("id") is not None else default
    if rid in seen:
        raise RecordError(f"{where}: duplicate id {rid!r} (first at {seen[rid]})")
    seen[rid] = where
    return rid


# --- splits ---------------------------------------------------------------------------------------
def ift_records(path, source: str) -> list[dict]:
    out, seen = [], {}
    for where, n, row in iter_rows(path, source):
        prompt, response = turn(where, row, need_reply=True)
        out.append({"id": _row_id(where, row, f"ift-{n}", seen), "prompt": prompt, "response": response})
    return out


def eval_records(path, source: str) -> tuple[list[dict], list[str]]:
    """(records {"id", "prompt", "dataset"?}, where each came from)."""
    out, wheres, seen = [], [], {}
    for where, n, row in iter_rows(path, source):
        prompt, _ = turn(where, row, need_reply=False)
        rec = {"id": _row_id(where, row, f"eval-{n}", seen), "prompt": prompt}
        if row.get("dataset") is not None:  # kept for the AlpacaEval export
            rec["dataset"] = str(row["dataset"])
        out.append(rec)
        wheres.append(where)
    return out, wheres


def _template_regex(template: str) -> re.Pattern:
    """The judge prompt with its two slots as groups: reads (instruction, response) back out of a rendered one."""
    t = template.strip()
    i, r = t.index(INSTRUCTION_SLOT), t.index(RESPONSE_SLOT)
    (a, sa), (b, sb) = sorted([(i, INSTRUCTION_SLOT), (r, RESPONSE_SLOT)])
    name = {INSTRUCTION_SLOT: "instruction", RESPONSE_SLOT: "response"}
    pattern = (re.escape(t[:a]) + f"(?P<{name[sa]}>.*?)" + re.escape(t[a + len(sa):b]) + f"(?P<{name[sb]}>.*)"
               + re.escape(t[b + len(sb):]))
    return re.compile(pattern, re.DOTALL)


def _score_text(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else str(score)


def _eft_row(where: str, row: dict, judge_prompt: re.Pattern) -> tuple[str, str, str, float]:
    """(instruction, response, judgment, score) of one EFT row."""
    if "messages" in row or "completion" in row:
        user, judgment = turn(where, row, need_reply=True)
        m = judge_prompt.fullmatch(user.strip())
        if m is None or not m["instruction"].strip() or not m["response"].strip():
            raise RecordError(f"{where}: the user turn is not the judge prompt (judge.template) with the instruction "
                              "and response filled in; give flat rows {prompt, response, judgment} instead, or set "
                              "judge.template to the template these rows were written with")
        instruction, response = m["instruction"], m["response"]
        if "score" in row:
            raise RecordError(f"{where}: score is read from the judgment's \"Score: n\" in this shape; drop the field")
        given = None
    else:
        key = next((k for k in ("prompt", "instruction") if k in row), None)
        if key is None:
            raise RecordError(f"{where}: missing field prompt (or instruction, or messages)")
        instruction = _text(where, key, row[key])
        if "response" not in row:
            raise RecordError(f"{where}: missing field response (the answer being judged)")
        response = _text(where, "response", row["response"])
        given = row.get("score")
        if given is not None and (isinstance(given, bool) or not isinstance(given, (int, float))
                                  or not 0 <= given <= 5):
            raise RecordError(f"{where}: score must be a number in 0..5, got {given!r}")
        if row.get("judgment") is None:
            if given is None:
                raise RecordError(f"{where}: missing field judgment (text ending in \"Score: n\") or score")
            judgment = f"Score: {_score_text(given)}"  # the judge then learns to answer with the score alone
        else:
            judgment = _text(where, "judgment", row["judgment"])
    score = parse_score(judgment)
    if score is None:
        raise RecordError(f"{where}: judgment has no final \"Score: n\" (n in 0..5) that the loop's parser reads: "
                          f"...{judgment[-60:]!r}")
    if given is not None and float(given) != score:
        raise RecordError(f"{where}: score {given} disagrees with the judgment's final \"Score: {_score_text(score)}\"")
    return instruction, response, judgment, score


def eft_records(path, source: str, judge_template: str, prefix: str = "eft") -> list[dict]:
    """EFT records in the seed's shape: group = group_id, else the instruction text; rank = the given
    rank, else dense rank of the score within the group (higher score = better)."""
    judge_prompt = _template_regex(judge_template)
    rows, seen = [], {}
    groups: dict[str, list[int]] = {}
    by_instruction: dict[str, str] = {}  # rows without group_id: one group per instruction text
    for where, n, row in iter_rows(path, source):
        instruction, response, judgment, score = _eft_row(where, row, judge_prompt)
        if row.get("group_id") is not None:
            gid = str(row["group_id"])
        else:
            gid = by_instruction.setdefault(instruction, f"{prefix}-group-{len(by_instruction)}")
        rank = row.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise RecordError(f"{where}: rank must be an integer >= 0 (0 = best), got {rank!r}")
        if gid in groups:
            first = rows[groups[gid][0]]
            if first["prompt"] != instruction:
                raise RecordError(f"{where}: group {gid!r} holds another instruction than its first row "
                                  f"({first['_where']})")
            if (first["rank"] is None) != (rank is None):
                raise RecordError(f"{where}: group {gid!r} mixes rows with and without rank (first: {first['_where']})")
        groups.setdefault(gid, []).append(len(rows))
        rows.append({"id": _row_id(where, row, f"{prefix}-{n}", seen), "group_id": gid, "prompt": instruction,
                     "response": response, "rank": rank, "judgment": judgment, "score": score, "_where": where})
    for idx in groups.values():
        if rows[idx[0]]["rank"] is None:
            for i, rank in zip(idx, dense_ranks([rows[i]["score"] for i in idx])):
                rows[i]["rank"] = rank
    for r in rows:
        del r["_where"]
    return rows


def _split_groups(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Whole groups held out for the judge's eval, a seeded shuffle as the OASST EFT builder does."""
    group_ids = sorted({r["group_id"] for r in records})
    random.Random(seed).shuffle(group_ids)
    held = set(group_ids[:round(len(group_ids) * fraction)])
    return [r for r in records if r["group_id"] not in held], [r for r in records if r["group_id"] in held]


def _keyed(key: str, read, *args):
    """read(*args), its RecordError prefixed with the config key of the file it names."""
    try:
        return read(*args)
    except RecordError as e:
        raise RecordError(f"data.{key}: {e}") from None


def user_seed_records(data, *, seed: int, judge_template: str) -> dict[str, list[dict]]:
    """All seed records of data.source = jsonl | hf (data: DataConfig): "ift", and "eft_train" + "eft_eval"
    when data.eft_path is set, "eval_prompts" when data.eval_path is set. Errors start with the config key."""
    src = data.source
    out = {"ift": _keyed("ift_path", ift_records, data.ift_path, src)}
    if data.eft_path is not None:
        eft = _keyed("eft_path", eft_records, data.eft_path, src, judge_template)
        if data.eft_eval_path is not None:
            out["eft_train"] = eft
            out["eft_eval"] = _keyed("eft_eval_path", eft_records, data.eft_eval_path, src, judge_template, "eft_eval")
        else:
            out["eft_train"], out["eft_eval"] = _split_groups(eft, data.eft_eval_fraction, seed)
    if data.eval_path is not None:
        prompts, wheres = _keyed("eval_path", eval_records, data.eval_path, src)
        # eval prompts are held out (docs/DATA.md): one also trained on would inflate every win rate
        trained = {r["prompt"].strip(): key for key, split in (("ift_path", "ift"), ("eft_path", "eft_train"))
                   for r in out.get(split, [])}
        for p, where in zip(prompts, wheres):
            if p["prompt"].strip() in trained:
                raise RecordError(f"data.eval_path: {where}: prompt {p['prompt'][:60]!r} is also in data."
                                  f"{trained[p['prompt'].strip()]}; eval prompts must be held out")
        out["eval_prompts"] = prompts
    return out


def build_seed(cfg, out_dir: str | Path, *, judge_template: str) -> dict[str, Path]:
    """The seed stage of every source but the world (cfg: LoopConfig): {split: written file}, each split
    read and checked in full before the first write, so a bad row leaves nothing behind."""
    from .oasst import convert, read_export, write_seed

    d = cfg.data
    if d.source == "oasst":
        sets = convert(read_export(d.oasst_path), ift_size=d.ift_size, eft_prompts=d.eft_prompts,
                       eval_size=d.eval_prompts, seed=cfg.run.seed)
    else:
        sets = user_seed_records(d, seed=cfg.run.seed, judge_template=judge_template)
    return write_seed(sets, out_dir)
