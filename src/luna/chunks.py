"""Candidate chunks served from the cache, cut from their scan on a miss.

A chunk is the ``shape_irc`` block of HU voxels (default 32×48×48, int16) with the
candidate's centre at voxel ``shape // 2`` (`luna.ct.crop`). `ChunkSource.get` is
what datasets call per sample; `ChunkSource.fill_series` is what prepcache calls
to cut all of one scan's chunks from a single load of it.

A miss on an uncompressed MetaImage scan reads only the chunk's region from disk
(`luna.io.read_chunk`), so even a cold cache serves random candidates at hundreds
per second instead of reloading a whole scan per sample; other formats load the
scan once and keep the last one in memory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from luna.cache import CACHE_FORMAT, ArrayCache
from luna.ct import CHUNK_SHAPE, DEFAULT_HU_RANGE, Ct
from luna.datadir import DataDir
from luna.io import format_for, load_ct, read_chunk, source_identity

__all__ = ["ChunkSource"]


class ChunkSource:
    """Chunks by (series uid, centre xyz) for the scans of one data directory.

    Picklable; each DataLoader worker keeps its own cache connections.
    """

    def __init__(
        self,
        data: DataDir,
        cache: ArrayCache | None,
        *,
        shape_irc: Sequence[int] = CHUNK_SHAPE,
        hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
    ):
        self.data = data
        self.cache = cache
        self.shape_irc = tuple(int(v) for v in shape_irc)
        self.hu_range = hu_range
        self._identities: dict[str, str] = {}

    def key(self, series_uid: str, center_xyz: Sequence[float]) -> str:
        """The cache key: format, scan identity, centre, shape and HU range."""
        identity = self._identities.get(series_uid)
        if identity is None:
            identity = self._identities[series_uid] = source_identity(self.data.scan_path(series_uid))
        x, y, z = (float(v) for v in center_xyz)
        shape = "x".join(map(str, self.shape_irc))
        return f"chunk/v{CACHE_FORMAT}/{series_uid}/{identity}/{x:.4f},{y:.4f},{z:.4f}/{shape}/{self.hu_range}"

    def get(self, series_uid: str, center_xyz: Sequence[float]) -> np.ndarray:
        """The chunk (int16, ``shape_irc``) around ``center_xyz`` in scan ``series_uid``."""
        if self.cache is None:
            return self._cut(series_uid, center_xyz)
        return self.cache.get_or_build(
            self.key(series_uid, center_xyz), lambda: self._cut(series_uid, center_xyz)
        )

    def fill_series(self, series_uid: str, centers_xyz: Iterable[Sequence[float]]) -> int:
        """Cache every missing chunk of one scan from a single load; returns how many were cut."""
        if self.cache is None:
            raise ValueError("fill_series needs a cache")
        todo = {self.key(series_uid, c): c for c in centers_xyz}
        missing = self.cache.missing(todo)
        if missing:
            ct = self._load(series_uid)
            for key in missing:
                self.cache.set(key, ct.crop(todo[key], self.shape_irc))
        return len(missing)

    def _cut(self, series_uid: str, center_xyz: Sequence[float]) -> np.ndarray:
        path = self.data.scan_path(series_uid)
        if format_for(path).read_region is not None:
            return read_chunk(path, center_xyz, self.shape_irc, hu_range=self.hu_range)
        return _load_last(path, self.hu_range).crop(center_xyz, self.shape_irc)

    def _load(self, series_uid: str) -> Ct:
        return load_ct(self.data.scan_path(series_uid), hu_range=self.hu_range)


@lru_cache(maxsize=1)
def _load_last(path: Path, hu_range: tuple[int, int] | None) -> Ct:
    return load_ct(path, hu_range=hu_range)
