"""Which data directory a command uses, and finding scans by series uid."""

import logging

import pytest

import luna.synth
from luna.datadir import DataDir, find_scans, resolve_cache_dir, resolve_data_dir
from luna.errors import LunaError


def _touch_scan(folder, uid):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{uid}.mhd").write_text("ObjectType = Image\n")
    return folder / f"{uid}.mhd"


def test_scans_found_in_subsets_and_flat(tmp_path):
    a = _touch_scan(tmp_path / "subset0", "1.1")
    b = _touch_scan(tmp_path / "subset7", "1.2")
    c = _touch_scan(tmp_path, "1.3")
    (tmp_path / "subset0" / "1.1.raw").write_bytes(b"")
    (tmp_path / "annotations.csv").write_text("")
    data = DataDir.open(tmp_path)
    assert data.scans == {"1.1": a, "1.2": b, "1.3": c}
    assert data.scan_path("1.2") == b
    with pytest.raises(LunaError, match="not in data directory"):
        data.scan_path("9.9")


def test_other_image_formats_are_scans_too(tmp_path):
    (tmp_path / "2.5.nii.gz").write_bytes(b"")
    (tmp_path / "2.6.mha").write_bytes(b"")
    assert sorted(find_scans(tmp_path)) == ["2.5", "2.6"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LUNA_DATA_DIR", raising=False)
    monkeypatch.delenv("LUNA_CACHE_DIR", raising=False)
    return tmp_path


def test_explicit_dir_must_exist_and_hold_scans(in_tmp, monkeypatch):
    with pytest.raises(LunaError, match="does not exist"):
        resolve_data_dir(in_tmp / "missing")
    (in_tmp / "empty").mkdir()
    with pytest.raises(LunaError, match="no scans found"):
        resolve_data_dir(in_tmp / "empty")
    monkeypatch.setenv("LUNA_DATA_DIR", str(in_tmp / "empty"))
    with pytest.raises(LunaError, match="no scans found"):
        resolve_data_dir()


def test_env_then_default(in_tmp, monkeypatch):
    _touch_scan(in_tmp / "env", "1.1")
    _touch_scan(in_tmp / "data-unversioned" / "luna" / "subset0", "2.2")
    assert resolve_data_dir().series_uids == ["2.2"]
    monkeypatch.setenv("LUNA_DATA_DIR", str(in_tmp / "env"))
    assert resolve_data_dir().series_uids == ["1.1"]
    assert resolve_data_dir(in_tmp / "data-unversioned" / "luna").series_uids == ["2.2"]


def test_no_data_falls_back_to_synthetic(in_tmp, monkeypatch, caplog):
    calls = []

    def fake_ensure(directory, preset="demo", **kwargs):
        calls.append((str(directory), preset))
        _touch_scan(in_tmp / directory / "subset0", "9.9")
        return directory

    monkeypatch.setattr(luna.synth, "ensure_dataset", fake_ensure)
    with caplog.at_level(logging.INFO):
        data = resolve_data_dir()
    assert data.is_synthetic and data.series_uids == ["9.9"]
    assert calls == [("data-unversioned/synthetic", "demo")]
    assert "synthetic" in caplog.text
    # an empty default folder counts as no data too
    (in_tmp / "data-unversioned" / "luna").mkdir(parents=True)
    assert resolve_data_dir().is_synthetic


def test_broken_default_dir_is_an_error_not_phantoms(in_tmp, monkeypatch):
    monkeypatch.setattr(luna.synth, "ensure_dataset", lambda *a, **k: pytest.fail("replaced by phantoms"))
    default = in_tmp / "data-unversioned" / "luna"
    default.mkdir(parents=True)
    (default / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    with pytest.raises(LunaError, match="no scans found"):
        resolve_data_dir()


def test_cache_dir_resolution(in_tmp, monkeypatch):
    assert str(resolve_cache_dir()) == "data-unversioned/cache"
    monkeypatch.setenv("LUNA_CACHE_DIR", "/x/y")
    assert str(resolve_cache_dir()) == "/x/y"
    assert str(resolve_cache_dir("z")) == "z"
