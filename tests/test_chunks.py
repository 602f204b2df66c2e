"""ChunkSource: cache hits, misses cut from the scan, stale entries never served."""

import os

import numpy as np
import pytest
from conftest import write_scan

import luna.chunks
from luna.cache import ArrayCache
from luna.chunks import ChunkSource
from luna.datadir import DataDir
from luna.geometry import Geometry
from luna.io.image import read_image

GEOMETRY = Geometry((-100.0, -90.0, -200.0), (0.8, 0.8, 2.0), np.diag([-1.0, -1.0, 1.0]).ravel())
UID = "1.3.6.1.4.1.99.1"


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 400, size=(40, 64, 64)).astype(np.int16)
    write_scan(tmp_path / "subset3" / f"{UID}.mhd", volume, GEOMETRY)
    return DataDir.open(tmp_path)


CENTERS = [GEOMETRY.irc_to_xyz(irc) for irc in [(20, 32, 32), (0, 0, 0), (39, 63, 10), (5.4, 60.6, 33.5)]]


def test_get_equals_crop_of_loaded_scan(data_dir, tmp_path):
    source = ChunkSource(data_dir, ArrayCache(tmp_path / "cache"), shape_irc=(8, 12, 12))
    ct = read_image(data_dir.scan_path(UID))
    for center in CENTERS:
        np.testing.assert_array_equal(source.get(UID, center), ct.crop(center, (8, 12, 12)))
        # second time from the cache
        np.testing.assert_array_equal(source.get(UID, center), ct.crop(center, (8, 12, 12)))


def test_fill_series_then_get_never_reads_the_scan(data_dir, tmp_path, monkeypatch):
    source = ChunkSource(data_dir, ArrayCache(tmp_path / "cache"))
    assert source.fill_series(UID, CENTERS) == len(CENTERS)
    assert source.fill_series(UID, CENTERS) == 0  # nothing left to do

    def no_reads(*args, **kwargs):
        raise AssertionError("read the scan on a warm cache")

    monkeypatch.setattr(luna.chunks, "read_chunk", no_reads)
    monkeypatch.setattr(luna.chunks, "load_ct", no_reads)
    for center in CENTERS:
        assert source.get(UID, center).shape == (32, 48, 48)


def test_changed_scan_is_not_served_from_cache(data_dir, tmp_path):
    cache = ArrayCache(tmp_path / "cache")
    center = CENTERS[0]
    before = ChunkSource(data_dir, cache).get(UID, center)
    path = data_dir.scan_path(UID)
    write_scan(path, np.full((40, 64, 64), 77, np.int16), GEOMETRY)
    # Same size, so only the modification time tells the new scan from the old: move
    # it on explicitly rather than hope the clock ticked (coarse under load).
    raw = path.with_suffix(".raw")
    stat = raw.stat()
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = ChunkSource(data_dir, cache).get(UID, center)
    assert (after == 77).all() and not (before == 77).all()


def test_works_without_cache(data_dir):
    chunk = ChunkSource(data_dir, None).get(UID, CENTERS[0])
    assert chunk.shape == (32, 48, 48) and chunk.dtype == np.int16


def test_unknown_series_is_a_clear_error(data_dir, tmp_path):
    from luna.errors import LunaError

    with pytest.raises(LunaError, match="not in data directory"):
        ChunkSource(data_dir, ArrayCache(tmp_path / "c")).get("9.9.9", CENTERS[0])
