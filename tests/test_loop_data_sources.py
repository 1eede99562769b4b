"""The user's own data (data.source = jsonl | hf): every row shape, the EFT shapes, each error path naming
file:line or the row and the field, config checks, and a 2-rank run whose seed stage reads JSONL."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loop.config import LoopConfigError, load_config
from loop.data.sources import build_seed, eft_records, eval_records, ift_records, user_seed_records
from loop.iterate import main
from loop.judge import PAPER_TEMPLATE, fill_template, load_template
from loop.records import RecordError, read_jsonl
from test_loop_bad_input import _checkpoint, _fails

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = load_template(PAPER_TEMPLATE)

IFT = [  # one row of each shape; ids given so JSONL and datasets can be compared record for record
    {"id": "a", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
                             {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Hi again."}]},
    {"id": "b", "prompt": "Name a color.", "completion": "Blue."},
    {"id": "c", "prompt": [{"role": "user", "content": "Count to 3."}],
     "completion": [{"role": "assistant", "content": "1 2 3"}]},
    {"id": "d", "instruction": "Name a fruit.", "response": "Pear."},
]
IFT_RECORDS = [{"id": "a", "prompt": "Say hi.", "response": "Hi!"},  # first turn only
               {"id": "b", "prompt": "Name a color.", "response": "Blue."},
               {"id": "c", "prompt": "Count to 3.", "response": "1 2 3"},
               {"id": "d", "prompt": "Name a fruit.", "response": "Pear."}]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _judge_turn(instruction, response):
    return {"role": "user", "content": fill_template(TEMPLATE, instruction, response)}


def test_ift_and_eval_shapes_from_jsonl(tmp_path):
    path = _jsonl(tmp_path / "ift.jsonl", IFT)
    assert ift_records(path, "jsonl") == IFT_RECORDS
    prompts, wheres = eval_records(_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": "Why is the sky blue?"}]},  # no reply needed
        {"prompt": [{"role": "user", "content": "Write a haiku."}], "dataset": "koala"},
        {"instruction": "List three primes."}]), "jsonl")
    assert prompts == [{"id": "eval-1", "prompt": "Why is the sky blue?"},  # id = line number by default
                       {"id": "eval-2", "prompt": "Write a haiku.", "dataset": "koala"},
                       {"id": "eval-3", "prompt": "List three primes."}]
    assert wheres == [f"{tmp_path / 'eval.jsonl'}:{n}" for n in (1, 2, 3)]


def test_ift_from_save_to_disk_and_parquet(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    # Arrow wants one type per column, so each shape is its own dataset
    for k, row in enumerate(IFT):
        ds = datasets.Dataset.from_list([row, {**row, "id": row["id"] + "2"}])
        ds.save_to_disk(str(tmp_path / f"d{k}"))
        ds.to_parquet(str(tmp_path / f"d{k}.parquet"))
        want = [IFT_RECORDS[k], {**IFT_RECORDS[k], "id": row["id"] + "2"}]
        assert ift_records(tmp_path / f"d{k}", "hf") == want
        assert ift_records(tmp_path / f"d{k}.parquet", "hf") == want
    # a table of both shapes: each row holds the other shape's columns as None
    mixed = datasets.Dataset.from_list([{**IFT[0], "prompt": None, "completion": None}, {**IFT[1], "messages": None}])
    mixed.to_parquet(str(tmp_path / "mixed.parquet"))
    assert ift_records(tmp_path / "mixed.parquet", "hf") == IFT_RECORDS[:2]
    nameless = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 2)
    nameless.save_to_disk(str(tmp_path / "nameless"))
    assert [r["id"] for r in ift_records(tmp_path / "nameless", "hf")] == ["ift-0", "ift-1"]  # the row index


def test_eft_flat_rows_groups_and_ranks(tmp_path):
    rows = [
        {"prompt": "Name a fruit.", "response": "Apple.", "judgment": "Correct and short. Score: 5"},
        {"prompt": "Add 2+2.", "response": "4", "judgment": "Right. Score: 4", "score": 4},
        {"prompt": "Name a fruit.", "response": "Car.", "score": 0},  # score only: the judgment is the score line
        {"prompt": "Name a fruit.", "response": "A fruit.", "score": 2.5},
        {"instruction": "Add 2+2.", "response": "five", "judgment": "Wrong. Score: 1"},
        {"id": "h1", "group_id": "human", "rank": 1, "prompt": "Hello?", "response": "Hi.", "score": 5},
        {"id": "h0", "group_id": "human", "rank": 0, "prompt": "Hello?", "response": "Hello!", "score": 3},
    ]
    recs = eft_records(_jsonl(tmp_path / "eft.jsonl", rows), "jsonl", TEMPLATE)
    by_id = {r["id"]: r for r in recs}
    assert [r["id"] for r in recs] == ["eft-1", "eft-2", "eft-3", "eft-4", "eft-5", "h1", "h0"]
    assert set(recs[0]) == {"id", "group_id", "prompt", "response", "rank", "judgment", "score"}
    fruit = [by_id[i] for i in ("eft-1", "eft-3", "eft-4")]  # same instruction = one group, ranked by score
    assert len({r["group_id"] for r in fruit}) == 1 and [r["rank"] for r in fruit] == [0, 2, 1]
    assert by_id["eft-3"]["judgment"] == "Score: 0" and by_id["eft-4"]["judgment"] == "Score: 2.5"
    assert [by_id[i]["rank"] for i in ("eft-2", "eft-5")] == [0, 1] and by_id["eft-5"]["score"] == 1.0
    assert by_id["eft-2"]["group_id"] != fruit[0]["group_id"]
    assert (by_id["h1"]["rank"], by_id["h0"]["rank"], by_id["h1"]["group_id"]) == (1, 0, "human")  # given ranks win


def test_eft_messages_through_the_judge_template(tmp_path):
    rows = [{"messages": [_judge_turn("Name a fruit.", "Apple."), {"role": "assistant", "content": "Good. Score: 4"}]},
            {"prompt": [_judge_turn("Name a fruit.", "Rock.\nSecond line.")],
             "completion": [{"role": "assistant", "content": "Not a fruit. Score: 0"}]}]
    recs = eft_records(_jsonl(tmp_path / "eft.jsonl", rows), "jsonl", TEMPLATE)
    assert [(r["prompt"], r["response"], r["score"], r["rank"]) for r in recs] == [
        ("Name a fruit.", "Apple.", 4.0, 0), ("Name a fruit.", "Rock.\nSecond line.", 0.0, 1)]
    for row, r in zip(rows, recs):  # SFT renders the same judge prompt again (loop/stage_train.py)
        user = row["messages"][0] if "messages" in row else row["prompt"][0]
        assert fill_template(TEMPLATE, r["prompt"], r["response"]) == user["content"]


def _data(**paths):
    from loop.config import DataConfig

    return DataConfig(source="jsonl", **{k: str(v) for k, v in paths.items()})


def test_seed_files_split_and_eval_path(tmp_path):
    groups = [{"group_id": f"g{g}", "prompt": f"Task {g}?", "response": f"answer {k}", "score": k}
              for g in range(8) for k in range(3)]
    ift = _jsonl(tmp_path / "ift.jsonl", IFT)
    eft = _jsonl(tmp_path / "eft.jsonl", groups)
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "Held out?"}])

    cfg = load_config(None, ["data.source=jsonl", f"data.ift_path={ift}", f"data.eft_path={eft}",
                             f"data.eval_path={ev}", "model.init=unused", "run.seed=3"])
    paths = build_seed(cfg, tmp_path / "seed", judge_template=TEMPLATE)
    assert sorted(paths) == ["eft_eval", "eft_train", "eval_prompts", "ift"]
    assert read_jsonl(paths["ift"], ("id", "prompt", "response")) == IFT_RECORDS
    train = read_jsonl(paths["eft_train"], ("id", "group_id", "prompt", "response", "rank", "judgment", "score"))
    held = read_jsonl(paths["eft_eval"], ("id", "group_id", "prompt", "response", "rank", "judgment", "score"))
    assert len({r["group_id"] for r in held}) == 2 and len(train) + len(held) == 24  # round(8 x 0.25) whole groups
    assert not {r["group_id"] for r in train} & {r["group_id"] for r in held}
    assert read_jsonl(paths["eval_prompts"], ("id", "prompt")) == [{"id": "eval-1", "prompt": "Held out?"}]
    other = user_seed_records(cfg.data, seed=4, judge_template=TEMPLATE)
    assert other["eft_eval"] != held  # the split is the run seed's

    sep = user_seed_records(_data(ift_path=ift, eft_path=eft, eft_eval_path=eft), seed=0, judge_template=TEMPLATE)
    assert len(sep["eft_train"]) == len(sep["eft_eval"]) == 24 and sep["eft_eval"][0]["id"] == "eft_eval-1"
    assert sorted(user_seed_records(_data(ift_path=ift), seed=0, judge_template=TEMPLATE)) == ["ift"]


MSG = {"role": "user", "content": "Hi?"}
BAD_ROWS = [  # (kind, row, what the one-line error must say)
    ("ift", {"text": "no shape"}, "missing field messages (or prompt / instruction)"),
    ("ift", {"messages": [{"role": "system", "content": "Be nice."}, MSG]}, "messages[0] has role 'system'"),
    ("ift", {"messages": [MSG]}, "no assistant turn"),
    ("ift", {"messages": [MSG, {"role": "assistant", "content": "  "}]}, "messages[1].content must be a non-empty"),
    ("ift", {"prompt": "Hi?"}, "missing field completion (or response)"),
    ("ift", {"prompt": [MSG], "completion": [{"role": "user", "content": "x"}]}, "completion[0] has role 'user'"),
    ("ift", {"prompt": [MSG, {"role": "assistant", "content": "a"}, MSG], "completion": "x"}, "prompt has 3 messages"),
    ("ift", {"prompt": [{"role": "system", "content": "s"}, MSG], "completion": "x"}, "prompt[0] has role 'system'"),
    ("ift", {"prompt": 7, "completion": "x"}, "prompt must be a string or a list of messages"),
    ("ift", "{not json", "invalid JSON"),
    ("eval", {"messages": [{"role": "assistant", "content": "x"}]}, "messages[0] has role 'assistant'"),
    ("eft", {"prompt": "Q?", "response": "A.", "judgment": "Looks fine."}, "no final \"Score: n\""),
    ("eft", {"prompt": "Q?", "response": "A.", "judgment": "Score: 7"}, "no final \"Score: n\""),
    ("eft", {"prompt": "Q?", "response": "A."}, "missing field judgment"),
    ("eft", {"prompt": "Q?", "judgment": "Score: 3"}, "missing field response"),
    ("eft", {"prompt": "Q?", "response": "A.", "score": 9}, "score must be a number in 0..5"),
    ("eft", {"prompt": "Q?", "response": "A.", "judgment": "ok. Score: 3", "score": 4}, "score 4 disagrees"),
    ("eft", {"prompt": "Q?", "response": "A.", "score": 3, "rank": -1}, "rank must be an integer >= 0"),
    ("eft", {"messages": [MSG, {"role": "assistant", "content": "Score: 3"}]}, "not the judge prompt"),
    ("eft", {"messages": [_judge_turn("Q?", "A."), {"role": "assistant", "content": "Score: 3"}], "score": 3},
     "score is read from the judgment"),
]


@pytest.mark.parametrize("kind,row,message", BAD_ROWS, ids=[f"{k}-{m[:24]}" for k, _, m in BAD_ROWS])
def test_bad_row_names_file_line_and_field(tmp_path, kind, row, message):
    good = {"ift": {"prompt": "Fine?", "completion": "Yes."}, "eval": {"prompt": "Fine?"},
            "eft": {"prompt": "Fine?", "response": "Yes.", "score": 5}}[kind]
    path = _jsonl(tmp_path / f"{kind}.jsonl", [good, row])
    read = {"ift": lambda: ift_records(path, "jsonl"), "eval": lambda: eval_records(path, "jsonl"),
            "eft": lambda: eft_records(path, "jsonl", TEMPLATE)}[kind]
    with pytest.raises(RecordError) as e:
        read()
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and "\n" not in str(e.value)


def test_dataset_level_errors(tmp_path, monkeypatch):
    ift = _jsonl(tmp_path / "ift.jsonl", [{"id": "x", "prompt": "p", "completion": "c"}] * 2)
    with pytest.raises(RecordError, match=r"ift.jsonl:2: duplicate id 'x' \(first at .*ift.jsonl:1\)"):
        ift_records(ift, "jsonl")
    with pytest.raises(RecordError, match=r"empty.jsonl:0: no rows"):
        ift_records(_jsonl(tmp_path / "empty.jsonl", []), "jsonl")
    eft = _jsonl(tmp_path / "eft.jsonl", [{"group_id": "g", "prompt": "A?", "response": "r", "score": 1},
                                          {"group_id": "g", "prompt": "B?", "response": "r", "score": 2}])
    with pytest.raises(RecordError, match=r"eft.jsonl:2: group 'g' holds another instruction .*eft.jsonl:1"):
        eft_records(eft, "jsonl", TEMPLATE)
    _jsonl(eft, [{"group_id": "g", "prompt": "A?", "response": "r", "score": 1, "rank": 0},
                 {"group_id": "g", "prompt": "A?", "response": "s", "score": 2}])
    with pytest.raises(RecordError, match=r"eft.jsonl:2: group 'g' mixes rows with and without rank"):
        eft_records(eft, "jsonl", TEMPLATE)
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "new"}, {"messages": [{"role": "user", "content": "p"}]}])
    with pytest.raises(RecordError, match=r"^data.eval_path: .*eval.jsonl:2: prompt 'p' is also in data.ift_path"):
        user_seed_records(_data(ift_path=_jsonl(ift, [{"prompt": "p", "completion": "c"}]), eval_path=ev), seed=0,
                          judge_template=TEMPLATE)
    with pytest.raises(RecordError, match=r"^data.ift_path: .*missing.jsonl:0: file not found"):
        user_seed_records(_data(ift_path=tmp_path / "missing.jsonl"), seed=0, judge_template=TEMPLATE)

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    ds = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": ""}])
    ds.save_to_disk(str(tmp_path / "d"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for p in (tmp_path / "d", tmp_path / "d.parquet"):
        with pytest.raises(RecordError, match=rf"^{p} row 1: completion must be a non-empty string"):
            ift_records(p, "hf")
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordError, match=r"a DatasetDict; point the path at one of its splits: .*dd/train, .*dd/test"):
        ift_records(tmp_path / "dd", "hf")
    with pytest.raises(RecordError, match=r"ift.jsonl: not a save_to_disk directory or a .parquet file"):
        ift_records(ift, "hf")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(RecordError, match=r"fake.parquet: cannot read as parquet"):
        ift_records(tmp_path / "fake.parquet", "hf")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(RecordError, match=r"needs the datasets package: pip install -e .\[data\]"):
        ift_records(tmp_path / "d", "hf")


@pytest.mark.parametrize("overrides,message", [
    (["data.source=jsonl", "model.init=x"], "data.ift_path is required when data.source = jsonl"),
    (["data.source=hf", "data.ift_path=x", "model.init=x"], "data.eval_path is required when data.source = hf"),
    (["data.source=jsonl", "data.ift_path=x", "data.eval_path=y"], "model.init must be a checkpoint path"),
    (["data.source=jsonl", "data.ift_path=x", "data.eval_path=y", "data.eft_eval_path=z", "model.init=x"],
     "data.eft_eval_path needs data.eft_path"),
    (["data.ift_path=x"], "data.ift_path is only read when data.source = jsonl or hf (it is world)"),
])
def test_config_checks(overrides, message):
    with pytest.raises(LoopConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_eval_path_may_be_left_out_without_eval():
    cfg = load_config(None, ["data.source=jsonl", "data.ift_path=x", "model.init=x", "eval.enabled=false"])
    assert cfg.data.eval_path is None and cfg.data.source == "jsonl"


def _jsonl_args(ckpt, **paths):
    return ["data.source=jsonl", f"model.init={ckpt}", "model.chat_template=llama2", "judge.template=paper",
            *(f"data.{k}={v}" for k, v in paths.items())]


def test_bad_input_stops_before_the_run_directory(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    ift = _jsonl(tmp_path / "ift.jsonl", IFT)
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "Held out?"}])
    run = tmp_path / "run"
    err = _fails(capsys, run, *_jsonl_args(ckpt, ift_path=tmp_path / "none.jsonl", eval_path=ev))
    assert "data.ift_path" in err and "none.jsonl" in err and "no such file" in err
    bad_eft = _jsonl(tmp_path / "eft.jsonl", [{"prompt": "Q?", "response": "A.", "score": 3},
                                              {"prompt": "Q?", "response": "B.", "judgment": "meh"}])
    err = _fails(capsys, run, *_jsonl_args(ckpt, ift_path=ift, eft_path=bad_eft, eval_path=ev))
    assert err.startswith(f"error: loop config: data.eft_path: {bad_eft}:2: judgment has no final")
    err = _fails(capsys, run, *_jsonl_args(ckpt, ift_path=ift, eval_path=ev), "data.source=hf")
    assert f"data.ift_path: {ift}: not a save_to_disk directory" in err


def _run_config(tmp_path) -> Path:
    """A tiny whole run on JSONL data: a random 1-layer Llama, 8 IFT rows, 3 EFT groups, 4 eval prompts."""
    import yaml
    from model.checkpoint import save_pretrained
    from model.config import LlamaConfig
    from test_model_parity import random_model

    spm = REPO / "tests" / "fixtures" / "llama2-spm" / "tokenizer.model"
    cfg = LlamaConfig(vocab_size=32000, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=1024,
                      bos_token_id=1, eos_token_id=2)
    ckpt = save_pretrained(random_model(cfg, seed=1), tmp_path / "ckpt", tokenizer_dir=spm)
    ift = _jsonl(tmp_path / "ift.jsonl", [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                                                        {"role": "assistant", "content": f"{i}"}]} for i in range(8)])
    eft = _jsonl(tmp_path / "eft.jsonl", [{"messages": [_judge_turn(f"Add {g} and 1.", str(g + k)),
                                                        {"role": "assistant", "content": f"Checked. Score: {4 - k}"}]}
                                          for g in range(3) for k in range(2)])
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": f"Spell {w}."} for w in ("cat", "dog", "sun", "sky")])
    tiny = {"run": {"seed": 0, "iterations": 0, "chunk_size": 2, "run_dir": str(tmp_path / "run")},
            "model": {"init": str(ckpt), "chat_template": "llama2"},
            "data": {"source": "jsonl", "ift_path": str(ift), "eft_path": str(eft), "eval_path": str(ev),
                     "eft_eval_fraction": 0.34},
            "judge": {"k": 1, "max_new_tokens": 4},
            "sft": {"epochs": 1, "global_batch": 4, "micro_batch": 2, "warmup_steps": 0, "checkpoint_every": 0},
            "eval": {"max_new_tokens": 4, "sft_baseline": False, "pairwise": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return path


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_read_the_seed_rank_0_wrote(tmp_path):
    """torchrun, 2 gloo ranks, ZeRO-3: rank 0 writes the seed from JSONL; both ranks train M1 on it (IFT +
    EFT) and each generates its shard of the eval prompts, so the eval holds every prompt once, in order."""
    config = _run_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "loop.iterate", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    seed = run / "seed"
    cfg = load_config(config)
    expected = user_seed_records(cfg.data, seed=0, judge_template=TEMPLATE)
    for name, records in expected.items():
        assert read_jsonl(seed / f"{name}.jsonl") == records, name
    assert json.loads((seed / "done.json").read_text()) == {"ift": 8, "eft_train": 4, "eft_eval": 2, "eval_prompts": 4}
    m1 = json.loads((run / "sft" / "M1" / "done.json").read_text())
    assert m1["steps"] == 3  # (8 IFT + 4 EFT) / global_batch 4: the EFT rows were trained on
    gens = read_jsonl(run / "eval" / "M1" / "generations.jsonl", ("id", "prompt", "text"))
    assert [(g["id"], g["prompt"]) for g in gens] == [(p["id"], p["prompt"]) for p in expected["eval_prompts"]]
    rm = json.loads((run / "eval" / "M1" / "done.json").read_text())
    assert "reward_model" in rm and "grader" not in rm  # a user eval set has no grader
    assert len(read_jsonl(run / "eval" / "M1" / "rm_judgments.jsonl", ("id", "target_id"))) == 2


def test_oasst_goes_through_the_same_dispatch(tmp_path):
    """The seed stage's one entry point (build_seed) writes the oasst files its CLI writes, byte for byte."""
    from loop.data.oasst import main as oasst_main

    export = REPO / "tests" / "fixtures" / "oasst_tiny.jsonl"
    assert oasst_main([str(export), str(tmp_path / "cli"), "--ift", "4", "--eft-prompts", "3", "--eval", "3"]) == 0
    cfg = load_config(None, ["data.source=oasst", f"data.oasst_path={export}", "data.ift_size=4", "data.eft_prompts=3",
                             "data.eval_prompts=3", "model.init=unused", "judge.template=paper"])
    paths = build_seed(cfg, tmp_path / "seed", judge_template=TEMPLATE)
    assert sorted(paths) == ["eft_candidates", "eval_prompts", "ift"]
    for name, p in paths.items():
        assert p.read_bytes() == (tmp_path / "cli" / f"{name}.jsonl").read_bytes(), name
