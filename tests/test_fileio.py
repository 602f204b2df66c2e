"""Atomic writes: the target is replaced whole or left alone."""

import pytest

from luna.fileio import replacing, write_atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "mask.nii.gz"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(path) as temporary:
            assert temporary.name.endswith(".nii.gz")  # writers that pick the format by suffix
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
