"""The CT format table (luna.io.formats): which reader takes a path, and the scan's identity."""

import os

import numpy as np
import pytest

from luna.ct import Ct
from luna.errors import LunaError
from luna.geometry import Geometry
from luna.io import (
    format_for,
    load_ct,
    read_chunk,
    register_format,
    scan_suffixes,
    series_uid_from_path,
    source_identity,
)
from luna.io.formats import CtFormat, registered_formats


def test_builtin_formats_by_name(tmp_path):
    assert format_for(tmp_path / "a.mhd").name == "MetaImage"
    assert format_for(tmp_path / "a.MHA").name == "MetaImage"
    assert format_for(tmp_path / "scan.nii.gz").name == "NIfTI"
    assert format_for(tmp_path / "scan.nii").name == "NIfTI"
    assert format_for(tmp_path).name == "DICOM series"
    assert format_for(tmp_path / "a.mhd").read_region is not None
    assert format_for(tmp_path / "a.nii.gz").read_region is None


def test_unknown_suffix_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LunaError, match=r"notes\.txt: not a CT luna reads.*\.nii\.gz"):
        format_for(tmp_path / "notes.txt")
    with pytest.raises(LunaError, match=r"missing\.txt: no such file or folder; give a DICOM series folder"):
        format_for(tmp_path / "missing.txt")


def test_check_volume_size(tmp_path):
    from luna.io.formats import MIN_SLICES, check_volume_size

    check_volume_size(tmp_path, (MIN_SLICES, 1, 1))
    with pytest.raises(LunaError, match="a single 4x5 slice, not a CT volume"):
        check_volume_size(tmp_path, (1, 4, 5))
    with pytest.raises(LunaError, match="0x4x5 voxels, it holds no image"):
        check_volume_size(tmp_path, (0, 4, 5))


def test_a_volume_larger_than_the_free_memory_is_refused_before_a_voxel_is_read(tmp_path, monkeypatch):
    from luna.io import formats

    free = formats.available_memory_bytes()
    assert free is None or free > 0
    # 64 slices of 512x512 read at 4 bytes a voxel: 64 MiB
    monkeypatch.setattr(formats, "available_memory_bytes", lambda: 63 * 2**20)
    with pytest.raises(LunaError, match=r"64 slices of 512x512 voxels need about 0\.1 GiB to read, but 0\.1 GiB"):
        formats.check_fits_in_memory(tmp_path, (64, 512, 512))
    formats.check_volume_size(tmp_path, (64, 512, 512))  # a region read needs no room for the whole volume
    monkeypatch.setattr(formats, "available_memory_bytes", lambda: 64 * 2**20)
    formats.check_fits_in_memory(tmp_path, (64, 512, 512))
    monkeypatch.setattr(formats, "available_memory_bytes", lambda: None)  # cannot be told: not refused
    formats.check_fits_in_memory(tmp_path, (64, 512, 512))


def test_check_regular_file(tmp_path):
    from luna.io.formats import check_regular_file

    check_regular_file(tmp_path / "missing")  # left to the reader's own message
    (tmp_path / "file").write_text("x")
    check_regular_file(tmp_path / "file")
    with pytest.raises(LunaError, match="a folder, where a file is expected"):
        check_regular_file(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(LunaError, match="not a regular file"):
        check_regular_file(tmp_path / "pipe")


def test_series_uid_strips_the_longest_suffix(tmp_path):
    assert series_uid_from_path(tmp_path / "1.2.3.nii.gz") == "1.2.3"
    assert series_uid_from_path(tmp_path / "1.2.3.mhd") == "1.2.3"
    assert ".nii.gz" in scan_suffixes() and scan_suffixes().index(".nii.gz") < scan_suffixes().index(".nii")


def test_source_identity_changes_with_the_file(tmp_path):
    mhd, raw = tmp_path / "a.mhd", tmp_path / "a-data.bin"
    mhd.write_text("NDims = 3\nElementDataFile = a-data.bin\n")
    raw.write_bytes(b"1234")
    before = source_identity(mhd)
    assert source_identity(mhd) == before
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    raw.write_bytes(b"12345")  # the data file the header names counts, not only the header
    assert source_identity(mhd) != before
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"x")
    first = source_identity(folder)
    (folder / "2.dcm").write_bytes(b"y")
    assert source_identity(folder) != first


def test_a_new_format_is_one_registration(tmp_path):
    """What adding a format takes: a reader and one register_format call; load_ct,
    read_chunk, the data-dir scan and the cache identity all follow."""
    from luna.datadir import find_scans

    def read_npy(path, *, series_uid=None, hu_range=None):
        hu = np.load(path).astype(np.int16)
        return Ct(hu, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), series_uid or series_uid_from_path(path), str(path))

    before = registered_formats()
    try:
        register_format(CtFormat("NumPy", read_npy, suffixes=(".npy",)))
        volume = np.arange(40 * 50 * 60, dtype=np.int16).reshape(40, 50, 60) % 900
        np.save(tmp_path / "1.2.840.5.npy", volume)
        ct = load_ct(tmp_path / "1.2.840.5.npy")
        assert ct.series_uid == "1.2.840.5" and (ct.hu == volume).all()
        chunk = read_chunk(tmp_path / "1.2.840.5.npy", (30.0, 25.0, 20.0), (4, 6, 6))
        assert chunk.shape == (4, 6, 6) and chunk[2, 3, 3] == volume[20, 25, 30]
        assert list(find_scans(tmp_path)) == ["1.2.840.5"]
        assert len(source_identity(tmp_path / "1.2.840.5.npy")) == 16
    finally:
        import luna.io.formats as formats

        formats._FORMATS[:] = list(before)
