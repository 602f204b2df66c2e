"""Chunk throughput and cache size on realistic 512×512 scans; writes JSON.

    python scripts/bench_chunks.py [--data-dir D] [--scans 4] [--out bench-chunks.json]

Without ``--data-dir`` it generates the synthetic ``bench`` preset (512×512 scans)
into ``data-unversioned/bench`` on first use. Measures, each as the median of
``--repeats`` runs with min and max:

- cold reads: random-order chunks with an empty chunk cache (scans in the OS page
  cache, as after any earlier read; say so when comparing);
- prepcache candidates/s, one process and ``--workers`` processes, and bytes on disk
  per cached candidate, for zstd level 0 (raw int16) and 1;
- warm reads: random-order chunks from the filled cache, one process and through a
  DataLoader with ``--workers`` workers and batch 32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchlib import machine, stats
from luna.annotations import load_candidate_infos
from luna.cache import ArrayCache
from luna.chunks import ChunkSource
from luna.datadir import DataDir
from luna.prepcache import prepcache


class _Chunks(Dataset):
    def __init__(self, source: ChunkSource, items):
        self.source, self.items = source, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        uid, center = self.items[i]
        return torch.from_numpy(self.source.get(uid, center))



def _rate(count, seconds):
    return count / seconds if seconds > 0 else float("inf")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="LUNA16-layout data (default: generate the synthetic bench preset)")
    parser.add_argument("--scans", type=int, default=4, help="scans to generate / use (default 4)")
    parser.add_argument("--samples", type=int, default=400, help="random chunks per read measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default="data-unversioned/bench-work", help="scratch caches (deleted)")
    parser.add_argument("--out", default="bench-chunks.json")
    args = parser.parse_args(argv)

    if args.data_dir:
        data = DataDir.open(args.data_dir)
    else:
        from luna.synth import ensure_dataset

        data = DataDir.open(ensure_dataset(Path("data-unversioned/bench"), "bench"))
    uids = data.series_uids[: args.scans]
    infos = load_candidate_infos(data.root, uids)
    by_series = defaultdict(list)
    for info in infos:
        by_series[info.series_uid].append(info.center_xyz)
    items = [(i.series_uid, i.center_xyz) for i in infos]
    rng = np.random.default_rng(0)
    shapes = {uid: None for uid in uids}
    for uid in uids:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(data.scan_path(uid)))
        reader.ReadImageInformation()
        shapes[uid] = list(reader.GetSize()[::-1])
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = {
        "machine": machine(),
        "data": {"dir": str(data.root), "scans": len(uids), "candidates": len(items), "scan_shapes_irc": shapes},
    }

    # cold: nothing cached; every read cuts its chunk from the scan file
    cold = []
    for repeat in range(args.repeats):
        order = rng.choice(len(items), size=min(args.samples, len(items)), replace=False)
        source = ChunkSource(data, ArrayCache(work / f"cold{repeat}"))
        start = time.perf_counter()
        for i in order:
            source.get(*items[i])
        cold.append(_rate(len(order), time.perf_counter() - start))
    result["cold_random_reads_per_s"] = stats(cold)

    for level in (0, 1):
        runs = {"1": [], str(args.workers): []}
        for repeat in range(args.repeats):
            for workers in (0, args.workers):
                cache = ArrayCache(work / f"pre{level}-{workers}-{repeat}", compress_level=level)
                summary = prepcache(ChunkSource(data, cache), dict(by_series), num_workers=workers, progress=False)
                runs["1" if workers == 0 else str(args.workers)].append(summary.candidates_per_second)
                bytes_per = summary.bytes_on_disk / max(summary.entries, 1)
        result[f"prepcache_zstd{level}"] = {
            "candidates_per_s": {f"{k}_process": stats(v) for k, v in runs.items()},
            "bytes_on_disk_per_candidate": bytes_per,
        }

        # warm: everything cached; read in random order
        source = ChunkSource(data, ArrayCache(work / f"pre{level}-0-0", compress_level=level))
        warm = []
        for repeat in range(args.repeats):
            order = rng.permutation(len(items))[: args.samples * 5]
            start = time.perf_counter()
            for i in order:
                source.get(*items[i])
            warm.append(_rate(len(order), time.perf_counter() - start))
        loader_rates = []
        for repeat in range(args.repeats):
            loader = DataLoader(_Chunks(source, items), batch_size=32, shuffle=True, num_workers=args.workers)
            start, count = time.perf_counter(), 0
            for batch in loader:
                count += len(batch)
            loader_rates.append(_rate(count, time.perf_counter() - start))
        result[f"warm_reads_zstd{level}"] = {
            "one_process_per_s": stats(warm),
            f"dataloader_{args.workers}_workers_batch32_per_s": stats(loader_rates),
        }
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
