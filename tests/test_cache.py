"""The array cache: compact, self-checking, keyed by source identity, multi-process safe."""

import multiprocessing
import pickle

import numpy as np
import pytest

from luna.cache import ArrayCache, CorruptEntry, decode_array, encode_array


@pytest.fixture
def chunk():
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 1000, size=(32, 48, 48)).astype(np.int16)


@pytest.mark.parametrize("level", [0, 1, 6])
def test_round_trip_keeps_dtype_shape_values(chunk, level):
    out = decode_array(encode_array(chunk, level))
    assert out.dtype == np.int16 and out.shape == chunk.shape
    np.testing.assert_array_equal(out, chunk)
    out[0, 0, 0] = 5  # writable


def test_int16_is_stored_compactly(chunk):
    assert len(encode_array(chunk, 0)) < chunk.nbytes + 64
    air = np.full((32, 48, 48), -1000, np.int16)
    assert len(encode_array(air, 1)) < air.nbytes / 50


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_bytes_are_detected(chunk, damage):
    blob = bytearray(encode_array(chunk, 1))
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "empty":
        blob = b""
    else:
        blob = b"\x00" * 100
    with pytest.raises(CorruptEntry):
        decode_array(bytes(blob))


def test_get_set_and_miss(tmp_path, chunk):
    cache = ArrayCache(tmp_path)
    assert cache.get("k") is None and "k" not in cache
    cache.set("k", chunk)
    assert "k" in cache and len(cache) == 1
    np.testing.assert_array_equal(cache.get("k"), chunk)
    assert cache.missing(["k", "other"]) == ["other"]
    assert cache.volume() > 0


def test_corrupt_entry_on_disk_is_rebuilt(tmp_path, chunk):
    cache = ArrayCache(tmp_path, compress_level=0)
    cache.set("k", chunk)
    # diskcache keeps large values in files of their own: cut them short, as a crash
    # halfway through a write would.
    value_files = [p for p in tmp_path.rglob("*.val")]
    assert value_files
    for path in value_files:
        path.write_bytes(path.read_bytes()[:1000])
    builds = []
    again = cache.get_or_build("k", lambda: builds.append(1) or chunk)
    assert builds == [1]
    np.testing.assert_array_equal(again, chunk)
    np.testing.assert_array_equal(cache.get("k"), chunk)


def test_pickles_for_dataloader_workers(tmp_path, chunk):
    cache = ArrayCache(tmp_path)
    cache.set("k", chunk)
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.get("k"), chunk)


def _writer(directory, worker, count):
    cache = ArrayCache(directory)
    for i in range(count):
        # the shared keys are written by both processes at once
        value = np.full((8, 16, 16), i, np.int16)
        cache.set(f"shared/{i}", value)
        cache.set(f"own/{worker}/{i}", value + worker)


def test_several_processes_write_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = ArrayCache(tmp_path)
    assert len(cache) == 40 + 3 * 40
    for i in range(40):
        assert (cache.get(f"shared/{i}") == i).all()
        for w in range(3):
            assert (cache.get(f"own/{w}/{i}") == i + w).all()
