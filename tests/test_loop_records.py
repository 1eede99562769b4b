"""JSONL records: atomic writes, torn-line recovery, file:line errors, stable seeds."""
import json
import pathlib
import subprocess
import sys

import pytest

from loop.records import JsonlAppender, RecordError, read_jsonl, stable_seed, write_jsonl

REPO = pathlib.Path(__file__).resolve().parent.parent


def _bad_line_17(path):
    lines = [json.dumps({"id": str(i), "prompt": f"p{i}", "response": "r"}) for i in range(30)]
    lines[16] = '{"id": "16", "prompt": "broken'
    path.write_text("\n".join(lines) + "\n")


def test_read_names_file_and_line(tmp_path):
    p = tmp_path / "ift.jsonl"
    _bad_line_17(p)
    with pytest.raises(RecordError, match=r"ift\.jsonl:17: invalid JSON"):
        read_jsonl(p)


def test_missing_field_and_duplicate(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\n')
    with pytest.raises(RecordError, match=r"a\.jsonl:2: missing field\(s\) prompt"):
        read_jsonl(p, ("id", "prompt"))
    p.write_text('{"id": "a"}\n\n{"id": "a"}\n')
    with pytest.raises(RecordError, match=r"a\.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        read_jsonl(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(RecordError, match=r"a\.jsonl:1: expected a JSON object"):
        read_jsonl(p)


def test_write_is_atomic(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"id": "1"}])

    def boom():
        yield {"id": "2"}
        raise RuntimeError("crash while producing records")

    with pytest.raises(RuntimeError):
        write_jsonl(p, boom())
    assert read_jsonl(p) == [{"id": "1"}]
    assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


@pytest.mark.parametrize("tail", ['{"id": "c", "te', '{"id": "c", "te\n', "\n\n"])
def test_appender_truncates_torn_tail(tmp_path, tail):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n' + tail)
    with JsonlAppender(p) as app:
        assert [r["id"] for r in app.records] == ["a", "b"]
        app.append([{"id": "c"}])
    assert [r["id"] for r in read_jsonl(p)] == ["a", "b", "c"]


def test_appender_rejects_corruption_and_duplicates(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(RecordError, match=r"r\.jsonl:2:"):
        JsonlAppender(p)
    p.write_text('{"id": "a"}\n')
    with JsonlAppender(p) as app:
        with pytest.raises(RecordError, match="written twice"):
            app.append([{"id": "a"}])


def test_stable_seed():
    assert stable_seed(0, "responses", "x") == stable_seed(0, "responses", "x")
    assert stable_seed(0, "responses", "x") != stable_seed(1, "responses", "x")
    assert stable_seed(0, "a", "bc") != stable_seed(0, "ab", "c")
    assert 0 <= stable_seed("anything") < 2**63


def test_cli_bad_line_17_exits_nonzero_and_writes_nothing(tmp_path):
    src = tmp_path / "export.jsonl"
    _bad_line_17(src)
    out = tmp_path / "seed"
    proc = subprocess.run([sys.executable, "-m", "loop.data.oasst", str(src), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    assert f"{src}:17:" in proc.stderr
    assert not out.exists()
