"""Atomic writes: a reader (another rank, a resumed run, a user) sees the old file or the new one, never
half of one. The new content goes to a unique temporary name in the same folder (same file system, so the
rename is atomic; unique, so ranks or processes writing the same path never share a temporary), is
fsynced, then renamed over the target. On any failure the temporary is removed and the target is untouched.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp) creates the content at tmp (e.g. torch.save, savefig); then it replaces path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # what write() left in the page cache reaches the disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished directory new onto target. os.replace cannot land on a non-empty directory, so an
    existing target is first moved aside (then deleted): target is always either the old or the new one."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return target
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
