"""common/atomic.py: a failed write leaves the old file and no temporary; a directory swap is all or nothing."""
import pytest

from common.atomic import atomic_write, atomic_write_bytes, atomic_write_text, replace_dir


def test_write_replaces_and_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "old")
    assert path.read_text() == "old"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and len(list(path.parent.iterdir())) == 1


def test_writer_that_replaces_its_file_is_followed(tmp_path):
    # torch.save / savefig open the temporary by name and may recreate it: the rename takes what they wrote
    import torch

    atomic_write(tmp_path / "t.pt", lambda tmp: torch.save({"x": torch.arange(3)}, tmp))
    assert torch.load(tmp_path / "t.pt", weights_only=True)["x"].tolist() == [0, 1, 2]


def test_replace_dir(tmp_path):
    target = tmp_path / "model"
    for content in ("first", "second"):
        new = tmp_path / f"new-{content}"
        new.mkdir()
        (new / "w.txt").write_text(content)
        replace_dir(new, target)
        assert (target / "w.txt").read_text() == content and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old one moved aside and deleted
