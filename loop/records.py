"""JSONL records: atomic whole-file writes, resumable appends, and strict reads that name file:line.

Every artifact of the loop is a JSONL file of objects with a stable string "id". A stage that
produces records incrementally appends them through `JsonlAppender`; if the process is killed
mid-write, the torn last line is cut off on reopen, so a resumed stage continues from the last
complete record. Any other malformed line is an error naming the file and line.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from common.atomic import atomic_write_text  # noqa: F401  (the loop's writers import it from here)


class RecordError(ValueError):
    """A record file that cannot be read as the loop expects; the message starts with "file:line:"."""


def stable_seed(*parts) -> int:
    """A 63-bit seed derived from its parts (run seed, stage, record id, ...), the same in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _dump(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write all records atomically (temp file + rename); returns the count."""
    lines = [_dump(r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _parse_line(path, lineno: int, line: str, required: Sequence[str]) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in required if k not in record]
    if missing:
        raise RecordError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
    return record


def iter_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; anything malformed raises RecordError naming file:line."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}:0: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, _parse_line(path, lineno, line, required)


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ("id",), *, unique_ids: bool = True) -> list[dict]:
    """Read a complete JSONL file; blank lines are skipped, anything malformed raises RecordError."""
    records, seen = [], {}
    for lineno, record in iter_jsonl(path, required):
        if unique_ids and "id" in record:
            if record["id"] in seen:
                raise RecordError(f"{path}:{lineno}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
            seen[record["id"]] = lineno
        records.append(record)
    return records


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class JsonlAppender:
    """Append-only JSONL writer for a stage in progress, resumable after a kill.

    On open, existing complete records are loaded (`.records`); a torn final line (no trailing
    newline, or not valid JSON at the end of the file) is truncated away. A malformed line that is
    not the last one is real corruption and raises RecordError. A write that fails (OSError: disk
    full) is cut back to the last complete record before the error propagates, so the file never
    holds a torn batch and a later open resumes from it.
    """

    def __init__(self, path: str | os.PathLike, required: Sequence[str] = ("id",)):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.ids: set[str] = set()
        if self.path.exists():
            self._recover(required)
        self._file = open(self.path, "ab", buffering=0)  # unbuffered: nothing left to flush after a failure
        self._size = os.fstat(self._file.fileno()).st_size

    def _recover(self, required: Sequence[str]) -> None:
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn write
        lines = data[:good_end].decode("utf-8").split("\n")[:-1]
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = _parse_line(self.path, lineno, line, required)
            except RecordError:
                if lineno == len(lines):  # a torn write can also end in a newline inside the text
                    good_end -= len(line.encode("utf-8")) + 1
                    break
                raise
            if record["id"] in self.ids:
                raise RecordError(f"{self.path}:{lineno}: duplicate id {record['id']!r}")
            self.ids.add(record["id"])
            self.records.append(record)
        if good_end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def append(self, records: Iterable[dict]) -> None:
        """Append a batch with one write + fsync; ids already present are an error (no duplicates)."""
        batch = list(records)
        for r in batch:
            if r["id"] in self.ids:
                raise RecordError(f"{self.path}: record id {r['id']!r} written twice")
        data = "".join(_dump(r) + "\n" for r in batch).encode("utf-8")
        fd = self._file.fileno()
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, self._size)  # frees what the failed write took, so it succeeds on a full disk
            raise
        self._size += len(data)
        for r in batch:
            self.ids.add(r["id"])
            self.records.append(r)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
