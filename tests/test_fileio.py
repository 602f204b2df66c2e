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


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import os
    import subprocess

    from luna.fileio import remove_stale_temporaries, temporary_path

    child = subprocess.Popen(["true"])
    child.wait()  # a pid that no longer runs
    dead = [tmp_path / f".run.json.{child.pid}.1a2b3c4d.partial.json", tmp_path / f".last.pt.{child.pid}.0f0f0f0f.tmp",
            tmp_path / f".report.json.{child.pid}.partial.json"]
    live = temporary_path(tmp_path / "best.pt")  # this process's: maybe still being written
    kept = [live, tmp_path / "run.json", tmp_path / ".hidden", tmp_path / f".notes.{child.pid}.txt"]
    for path in dead + kept:
        path.write_text("x")
    assert live.name.startswith(f".best.pt.{os.getpid()}.") and live.name.endswith(".partial.pt")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(dead)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_writable_directory(tmp_path):
    from luna.errors import LunaError
    from luna.fileio import writable_directory

    assert writable_directory(tmp_path / "new" / "out", "--out").is_dir()
    assert list((tmp_path / "new" / "out").iterdir()) == []  # the write test leaves nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(LunaError, match=r"--out .*file is an existing file"):
        writable_directory(tmp_path / "file", "--out")
    with pytest.raises(LunaError, match=r"--out .*below: cannot write there"):
        writable_directory(tmp_path / "file" / "below", "--out")


def test_writable_directory_check_only_leaves_nothing(tmp_path):
    from luna.fileio import writable_directory

    assert writable_directory(tmp_path / "a" / "b" / "out", "--out", keep=False) == tmp_path / "a" / "b" / "out"
    assert list(tmp_path.iterdir()) == []  # every directory the check made is gone again
    (tmp_path / "there").mkdir()
    writable_directory(tmp_path / "there", "--out", keep=False)
    assert (tmp_path / "there").is_dir()  # what existed before stays
