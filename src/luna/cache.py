"""On-disk cache of numpy arrays (candidate chunks, per-scan data) on diskcache.

Why a cache: cutting a chunk needs its scan, and scans are big (LUNA16 is 120 GB).
Training reads the same chunks every epoch, so they are cut once and kept here.

What makes an entry trustworthy:

- Keys carry ``CACHE_FORMAT`` (bump it when what is stored changes meaning) and the
  identity of the source file (name, size, modification time; `luna.io.source_identity`),
  so an entry made from another version of a scan is never found, let alone served.
- Values are self-describing bytes: a header (magic, format, codec, dtype, shape),
  a CRC-32 of the array bytes, then the array, optionally zstd-compressed. An entry
  that does not decode to what its header promises (half-written, truncated,
  bit-rotted) is deleted and reported as a miss, so the caller rebuilds it:
  training never crashes on a bad entry.
- diskcache makes writes atomic and safe from several processes (DataLoader
  workers, prepcache workers) at once; a `FanoutCache` spreads writers over shards
  so they rarely wait for each other's SQLite lock.
- diskcache writes a large value to its own file first and commits the entry
  after; a writer killed in between leaves a value file no entry refers to.
  `ArrayCache.remove_orphans` deletes those (prepcache and training call it when
  they start).
- A cache directory that cannot be opened or written (read-only, full disk) is a
  `LunaError` naming it, not an SQLite traceback.

Arrays are stored in their own dtype: chunks are int16 HU, half the bytes of the
float32 the book stored, and zstd level 1 takes another 30% off. zstd rather than
the standard library's zlib because, on 512×512 bench chunks (issue 2's
measurements), zlib level 1 saved about as much (ratio 0.69 vs 0.70) but
compressed 11× and decompressed 4× slower (400 vs 4,400 and 1,300 vs 5,600 chunks/s),
which made warm cache reads 6× slower than raw ones.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable

import diskcache
import numpy as np
import zstandard

from luna.errors import LunaError

__all__ = ["CACHE_FORMAT", "DEFAULT_COMPRESS_LEVEL", "ArrayCache", "decode_array", "encode_array"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Part of every key: bump when the meaning of what is cached changes (2: chunks repeat the end slices)."""

DEFAULT_COMPRESS_LEVEL = 1
"""zstd level of new entries: as small as zlib, 4-11x faster on CT chunks (docs/architecture.md)."""

_MAGIC = b"LUNA"
_CODEC_RAW, _CODEC_ZSTD = 0, 2
# magic, format, codec, ndim, dtype (4 chars, e.g. "<i2 "), crc32 of the raw array bytes
_HEADER = struct.Struct("<4sBBB4sI")


class CorruptEntry(ValueError):
    """A cached value that does not decode to the array its header describes."""


def encode_array(array: np.ndarray, compress_level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """Self-describing bytes for ``array``, zstd at ``compress_level`` (0: stored raw)."""
    array = np.ascontiguousarray(array)
    dtype = array.dtype.str.encode("ascii")
    if len(dtype) > 4 or array.ndim > 255:
        raise ValueError(f"cannot cache arrays of dtype {array.dtype} with {array.ndim} dims")
    raw = array.tobytes()
    codec, payload = _CODEC_RAW, raw
    if compress_level > 0:
        codec, payload = _CODEC_ZSTD, zstandard.compress(raw, compress_level)
    header = _HEADER.pack(_MAGIC, CACHE_FORMAT, codec, array.ndim, dtype.ljust(4), zlib.crc32(raw))
    shape = struct.pack(f"<{array.ndim}Q", *array.shape)
    return header + shape + payload


def decode_array(blob: bytes) -> np.ndarray:
    """The array `encode_array` stored; `CorruptEntry` when the bytes are not intact."""
    try:
        magic, fmt, codec, ndim, dtype, crc = _HEADER.unpack_from(blob)
        if magic != _MAGIC or fmt != CACHE_FORMAT or codec not in (_CODEC_RAW, _CODEC_ZSTD):
            raise CorruptEntry("bad header")
        shape = struct.unpack_from(f"<{ndim}Q", blob, _HEADER.size)
        payload = memoryview(blob)[_HEADER.size + 8 * ndim :]
        raw = zstandard.decompress(payload) if codec == _CODEC_ZSTD else payload
        dtype = np.dtype(dtype.decode("ascii").strip())
        if len(raw) != dtype.itemsize * int(np.prod(shape)) or zlib.crc32(raw) != crc:
            raise CorruptEntry("size or checksum mismatch")
    except (struct.error, zstandard.ZstdError, TypeError, UnicodeDecodeError) as err:
        raise CorruptEntry(str(err)) from None
    # frombuffer over bytes is read-only; a copy lets callers augment in place.
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


class ArrayCache:
    """Numpy arrays by string key in a directory, safe across processes.

    Picklable (it reopens its directory), so it can be handed to DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike, *, compress_level: int = DEFAULT_COMPRESS_LEVEL, shards: int = 8):
        self.directory = Path(directory)
        self.compress_level = compress_level
        self.shards = shards
        self._cache: diskcache.FanoutCache | None = None

    @property
    def _store(self) -> diskcache.FanoutCache:
        # Opened lazily, so each DataLoader worker opens its own SQLite connections.
        if self._cache is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._cache = diskcache.FanoutCache(
                    str(self.directory),
                    shards=self.shards,
                    timeout=60,
                    # A training cache is sized by the data set, not by a default of 1 GB
                    # that would evict half of it silently.
                    size_limit=2**50,
                    eviction_policy="none",
                )
            except (OSError, sqlite3.Error) as err:
                raise self._error("cannot open", err) from None
        return self._cache

    def _error(self, doing: str, err: BaseException) -> LunaError:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        return LunaError(f"cache directory {self.directory}: {doing} it ({reason}); choose a --cache-dir "
                         f"(or LUNA_CACHE_DIR) that you can write to and that has free space")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: str) -> np.ndarray | None:
        """The array under ``key``, or None when absent or not intact (then it is deleted)."""
        blob = self._store.get(key, default=None, retry=True)
        if blob is None:
            return None
        try:
            return decode_array(blob)
        except CorruptEntry as err:
            log.warning("cache entry %r in %s is corrupt (%s); rebuilding it", key, self.directory, err)
            self._store.delete(key, retry=True)
            return None

    def set(self, key: str, array: np.ndarray) -> None:
        try:
            self._store.set(key, encode_array(array, self.compress_level), retry=True)
        except (OSError, sqlite3.Error) as err:
            raise self._error("cannot write to", err) from None

    def get_or_build(self, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array, or ``build()``'s result, cached on the way."""
        array = self.get(key)
        if array is None:
            array = build()
            self.set(key, array)
        return array

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not in the cache (presence only; intactness is checked on `get`)."""
        store = self._store
        return [key for key in keys if key not in store]

    def remove_orphans(self) -> int:
        """Delete the value files no entry refers to; returns how many (see the module docstring).

        Meant for when a run starts: a writer that is busy at the same moment may lose
        a value file it wrote but had not committed yet, and its entry then reads as a
        miss and is rebuilt, never as a wrong array.
        """
        removed = 0
        for shard in self._store._shards:  # diskcache keeps no public list of its shards
            directory = Path(shard.directory)
            try:
                rows = shard._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()
            except sqlite3.Error as err:
                raise self._error("cannot read", err) from None
            known = {os.path.normpath(name) for (name,) in rows}
            for path in directory.rglob("*.val"):
                if os.path.normpath(path.relative_to(directory)) not in known:
                    path.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("removed %d value file(s) without an entry from %s (left by an interrupted run)",
                     removed, self.directory)
        return removed

    def volume(self) -> int:
        """Bytes on disk (SQLite shards and value files)."""
        return int(self._store.volume())

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
