"""Chunk throughput and cache size: cold and warm reads, prepcache, bytes per candidate.

- cold reads: chunks in random order with an empty chunk cache, so each read cuts
  its chunk from the scan file (the files themselves are in the OS page cache, as
  after any earlier read: a truly cold disk is slower);
- prepcache: candidates/s filling an empty cache, in one process and in
  ``workers`` processes, and the bytes on disk per cached candidate;
- warm reads: random-order chunks from the filled cache, in one process and
  through a ``DataLoader`` with ``workers`` workers and batch 32 over the training's
  own `luna.data.ChunkDataset` (float32 tensors with labels, as the nodule stage
  reads them).

Each is measured for the cache's default compression (zstd level 1) and, with
``raw=True``, for uncompressed int16 (level 0) as a comparison.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from luna.annotations import load_candidate_infos
from luna.bench.measure import rate, stats
from luna.cache import DEFAULT_COMPRESS_LEVEL, ArrayCache
from luna.chunks import ChunkSource
from luna.data import ChunkDataset
from luna.datadir import DataDir
from luna.errors import LunaError
from luna.prepcache import prepcache

__all__ = ["bench_chunks"]

LOADER_BATCH = 32


def _random_reads(source: ChunkSource, items: list, order) -> float:
    start = time.perf_counter()
    for i in order:
        source.get(*items[i])
    return rate(len(order), time.perf_counter() - start)


def bench_chunks(
    data: DataDir, uids: list[str], work: Path, *, repeats: int, samples: int, workers: int, raw: bool
) -> dict:
    infos = load_candidate_infos(data.root, uids)
    if not infos:
        raise LunaError(f"{data.root}: no candidates for the benchmark scans in candidates.csv")
    items = [(info.series_uid, info.center_xyz) for info in infos]
    by_series = defaultdict(list)
    for uid, center in items:
        by_series[uid].append(center)
    rng = np.random.default_rng(0)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"scans": len(uids), "candidates": len(items), "workers": workers}

    cold = []
    for repeat in range(repeats):
        order = rng.choice(len(items), size=min(samples, len(items)), replace=False)
        directory = work / f"cold-{repeat}"
        cold.append(_random_reads(ChunkSource(data, ArrayCache(directory)), items, order))
        shutil.rmtree(directory, ignore_errors=True)
    result["cold_random_reads_per_s"] = stats(cold)

    levels = (DEFAULT_COMPRESS_LEVEL, 0) if raw else (DEFAULT_COMPRESS_LEVEL,)
    for level in levels:
        runs: dict[int, list[float]] = {1: [], workers: []}
        bytes_per = 0.0
        for repeat in range(repeats):
            for processes in sorted(runs):
                directory = work / f"prepcache-{level}-{processes}-{repeat}"
                summary = prepcache(
                    ChunkSource(data, ArrayCache(directory, compress_level=level)), dict(by_series),
                    num_workers=0 if processes == 1 else processes, progress=False,
                )
                runs[processes].append(summary.candidates_per_second)
                bytes_per = summary.bytes_on_disk / max(summary.entries, 1)
        filled = ArrayCache(work / f"prepcache-{level}-1-0", compress_level=level)
        source = ChunkSource(data, filled)
        warm = [
            _random_reads(source, items, rng.permutation(len(items))[: samples * 5]) for _ in range(repeats)
        ]
        loader_rates = []
        for _ in range(repeats):
            loader = DataLoader(ChunkDataset(infos, source), batch_size=LOADER_BATCH, shuffle=True,
                                num_workers=workers)
            start, count = time.perf_counter(), 0
            for batch in loader:
                count += len(batch.chunk)
            loader_rates.append(rate(count, time.perf_counter() - start))
        result[f"zstd_level_{level}"] = {
            "bytes_on_disk_per_candidate": bytes_per,
            "prepcache_candidates_per_s": {f"{p}_process{'es' if p > 1 else ''}": stats(v) for p, v in runs.items()},
            "warm_reads_per_s": {
                "one_process": stats(warm),
                f"dataloader_{workers}_workers_batch_{LOADER_BATCH}": stats(loader_rates),
            },
        }
    shutil.rmtree(work, ignore_errors=True)
    return result
