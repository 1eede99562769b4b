"""A write that fails (disk full) in the middle of a stage: the stage's .partial folder holds complete
records only, and --resume continues from it to the records an uninterrupted run writes."""
import errno
import os
from pathlib import Path

import pytest
import torch

from engine.distributed import init_distributed
from engine.sampler import Sampler
from loop import records as R
from loop import stage_aift as A
from loop.config import load_config
from loop.records import JsonlAppender, read_jsonl, write_jsonl
from loop.stage_dir import StageDir
from model.config import preset
from model.llama import Llama
from model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SPM = ROOT / "tests" / "fixtures" / "llama2-spm" / "tokenizer.model"


def _disk_full_after(monkeypatch, n_ok: int):
    """_write_all succeeds n_ok times, then writes half its bytes and fails like a full disk."""
    real, calls = R._write_all, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) > n_ok:
            os.write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(R, "_write_all", write)
    return calls


def _lines_are_complete(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return read_jsonl(path)


def test_appender_cuts_a_failed_write_back(tmp_path, monkeypatch):
    path = tmp_path / "x.jsonl"
    a = JsonlAppender(path)
    a.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    _disk_full_after(monkeypatch, 0)
    with pytest.raises(OSError, match="No space"):
        a.append([{"id": "c", "v": "x" * 100}, {"id": "d", "v": 4}])
    a.close()
    assert [r["id"] for r in _lines_are_complete(path)] == ["a", "b"]
    monkeypatch.undo()  # space is back
    with JsonlAppender(path) as b:
        assert b.ids == {"a", "b"}
        b.append([{"id": "c", "v": 3}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_atomic_rewrite_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"id": "a"}])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(R.os, "replace", full)
    with pytest.raises(OSError):
        write_jsonl(path, [{"id": "a"}, {"id": "b"}])
    monkeypatch.undo()
    assert read_jsonl(path) == [{"id": "a"}] and list(tmp_path.iterdir()) == [path]  # no temp file left


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("write_failure")
    tok = load_tokenizer(SPM)
    cfg_m = preset("tiny", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=tok.vocab_size,
                   max_seq_len=96, eos_token_id=None, tie_embeddings=False)
    model = Llama(cfg_m).init_weights(std=0.1, generator=torch.Generator().manual_seed(0)).eval()
    sampler = Sampler(model, tokenizer=tok, kv_memory=1 << 22, block_size=16, cuda_graphs=False)
    cfg = load_config(None, ["responses.n=2", "responses.max_new_tokens=6", "run.chunk_size=2"])
    write_jsonl(work / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Task number {i}: say something."}
                                         for i in range(7)])
    return work, tok, sampler, cfg


def _responses_stage(env, run: Path) -> dict:
    work, tok, sampler, cfg = env
    dist = init_distributed()
    st = StageDir(run / "iter_1" / "2_responses", dist)
    w = st.begin()
    return st.finish(A.gen_responses(sampler, tok, dist, cfg, prompts_path=work / "prompts.jsonl", work=w,
                                     iteration=1))


@pytest.mark.parametrize("n_ok", [1, 3])  # the disk fills after the 2nd or the last chunk (7 prompts, 2 a chunk)
def test_disk_full_mid_stage_then_resume(stage_env, monkeypatch, n_ok):
    work = stage_env[0]
    ref = work / f"ref{n_ok}"
    ref_summary = _responses_stage(stage_env, ref)
    run = work / f"full{n_ok}"
    calls = _disk_full_after(monkeypatch, n_ok)
    with pytest.raises(OSError, match="No space"):
        _responses_stage(stage_env, run)
    assert len(calls) == n_ok + 1
    partial = run / "iter_1" / "2_responses.partial" / "responses.jsonl"
    assert not (run / "iter_1" / "2_responses").exists()
    kept = _lines_are_complete(partial)
    assert len(kept) == 2 * 2 * n_ok  # the chunks written before the failure, whole
    expect = read_jsonl(ref / "iter_1" / "2_responses" / "responses.jsonl")
    assert kept == [r for r in expect if r["id"] in {k["id"] for k in kept}]
    monkeypatch.undo()  # space is back: --resume reruns the stage in the same folder
    assert _responses_stage(stage_env, run) == ref_summary
    assert read_jsonl(run / "iter_1" / "2_responses" / "responses.jsonl") == expect
    assert not partial.parent.exists()


def test_main_reports_a_write_failure_in_one_line(tmp_path, monkeypatch, capsys):
    from loop import iterate

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(iterate.Loop, "run", full)
    assert iterate.main(["--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and "--resume" in err
