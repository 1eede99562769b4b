"""Bad input: one line naming the config key or file:line, exit code 2, and the run directory untouched
(not created, or on --resume left byte for byte as it was), all found before any stage works."""
import json
import shutil
from pathlib import Path

from loop import manifest as M
from loop.config import load_config
from loop.iterate import main
from loop.preflight import preflight
from model.checkpoint import save_pretrained
from model.config import LlamaConfig
from model.llama import Llama

ROOT = Path(__file__).resolve().parent.parent
SPM = ROOT / "tests" / "fixtures" / "llama2-spm" / "tokenizer.model"
OASST = ROOT / "tests" / "fixtures" / "oasst_tiny.jsonl"


def _checkpoint(directory: Path, vocab_size: int = 32000, template: str | None = None) -> Path:
    cfg = LlamaConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64)
    save_pretrained(Llama(cfg).init_weights(0.02), directory)
    shutil.copy(SPM, directory / "tokenizer.model")
    if template is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return directory


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} \
        if run.exists() else None


def _fails(capsys, run: Path, *args) -> str:
    before = _snapshot(run)
    rc = main(["--run-dir", str(run), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert _snapshot(run) == before  # nothing created, nothing half-written
    return err


def _oasst(tmp_path, ckpt, path):
    return ["data.source=oasst", f"data.oasst_path={path}", f"model.init={ckpt}", "judge.template=paper"]


def test_unknown_key_wrong_type_missing_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert "unknown key sft.bogus" in _fails(capsys, run, "sft.bogus=1")
    assert "run.iterations='abc' must be an integer" in _fails(capsys, run, "run.iterations=abc")
    assert "nope.yaml not found" in _fails(capsys, run, "--config", str(tmp_path / "nope.yaml"))


def test_judge_template_without_slots_found_before_m0(tmp_path, capsys):
    bad = tmp_path / "judge.txt"
    bad.write_text("Rate this answer from 0 to 5.\n")
    err = _fails(capsys, tmp_path / "run", f"judge.template={bad}")
    assert "judge.template" in err and f"{bad}:1:" in err and "<INSTRUCTION_HERE>" in err


def test_model_init_is_checked_with_world_data(tmp_path, capsys):
    err = _fails(capsys, tmp_path / "run", f"model.init={tmp_path / 'missing'}")
    assert "model.init" in err and "no such file" in err
    ckpt = tmp_path / "exists"
    ckpt.mkdir()
    err = _fails(capsys, tmp_path / "run", f"model.init={ckpt}")
    assert "model.init" in err and "not a checkpoint" in err


def test_oasst_line_not_json_and_record_missing_field(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    lines = OASST.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    err = _fails(capsys, tmp_path / "run", *_oasst(tmp_path, ckpt, bad))
    assert "data.oasst_path" in err and f"{bad}:3: invalid JSON" in err
    record = json.loads(lines[0])
    record.pop("message_id", None)
    if "prompt" in record:  # the trees format: the message id sits in the prompt message
        record["prompt"].pop("message_id")
    bad.write_text("\n".join([lines[1], json.dumps(record)] + lines[2:]) + "\n")
    err = _fails(capsys, tmp_path / "run", *_oasst(tmp_path, ckpt, bad))
    assert f"{bad}:2:" in err and "message_id" in err
    assert "oasst" in _fails(capsys, tmp_path / "run", *_oasst(tmp_path, ckpt, tmp_path / "none.jsonl"))


def test_tokenizer_vocabulary_must_fit_the_embedding(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt", vocab_size=1000)
    err = _fails(capsys, tmp_path / "run", *_oasst(tmp_path, ckpt, OASST))
    assert "model.init" in err and "32000 tokens" in err and "vocab_size=1000" in err
    other = _checkpoint(tmp_path / "padded", vocab_size=32064)  # an embedding padded past the tokenizer is fine
    preflight(load_config(None, _oasst(tmp_path, other, OASST)), tmp_path / "run", resume=False)


def test_unusable_chat_template_asks_for_model_chat_template(tmp_path, capsys):
    refuses = "{{ raise_exception('no chat format for this model') }}"
    ckpt = _checkpoint(tmp_path / "ckpt", template=refuses)
    err = _fails(capsys, tmp_path / "run", *_oasst(tmp_path, ckpt, OASST))
    assert "model.chat_template" in err and "no chat format for this model" in err
    preflight(load_config(None, _oasst(tmp_path, ckpt, OASST) + ["model.chat_template=llama2"]), tmp_path / "run",
              resume=False)


def test_resume_with_a_broken_seed_file_leaves_the_run_as_it_was(tmp_path, capsys):
    run = tmp_path / "run"
    M.open_run(run, load_config(ROOT / "configs" / "cpu_default.yaml", [f"run.run_dir={run}"]), resume=False,
               force_config=False)
    seed = run / "seed"
    seed.mkdir()
    (seed / "ift.jsonl").write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": \n')
    (seed / "done.json").write_text("{}")
    err = _fails(capsys, run, "--resume")
    assert f"{seed / 'ift.jsonl'}:2: invalid JSON" in err


def test_existing_run_without_resume_is_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    M.open_run(run, load_config(ROOT / "configs" / "cpu_default.yaml", [f"run.run_dir={run}"]), resume=False,
               force_config=False)
    assert "--resume" in _fails(capsys, run)
