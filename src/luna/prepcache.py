"""``python -m luna.prepcache``: cut every candidate's chunk once and keep it in the cache.

Training then reads chunks from the cache instead of from 120 GB of scans. Work is
split by scan, so each scan is loaded once however many candidates it has, and
scans are spread over ``--num-workers`` processes (diskcache lets them write at
once). Chunks already cached are skipped, so an interrupted run resumes where it
stopped (even after kill -9: every entry is committed whole, and the value files
a killed writer leaves are removed when the next run starts). A scan that cannot be
read is reported at the end, with its error, and the run exits with status 2; the
other scans are cached all the same, and the summary counts the candidates of the
failed scans apart from those already cached.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from luna.annotations import load_candidate_infos
from luna.cache import ArrayCache
from luna.chunks import ChunkSource
from luna.cli import ArgumentParser, add_data_arguments, progress_enabled, prog, run_cli
from luna.ct import CHUNK_SHAPE
from luna.datadir import resolve_cache_dir, resolve_data_dir
from luna.errors import LunaError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepcacheSummary:
    scans: int
    candidates: int
    cut: int
    failed: int
    """Candidates of the scans that could not be read (not cut, not cached)."""
    entries: int
    bytes_on_disk: int
    seconds: float
    failures: tuple[tuple[str, str], ...]

    @property
    def candidates_per_second(self) -> float:
        return self.candidates / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        per_entry = self.bytes_on_disk / self.entries if self.entries else 0
        failed = f", {self.failed} not cut (scan failed)" if self.failed else ""
        return (
            f"{self.candidates} candidates in {self.scans} scans: {self.cut} chunks cut, "
            f"{self.candidates - self.cut - self.failed} already cached{failed}, in {self.seconds:.1f} s "
            f"({self.candidates_per_second:.0f} candidates/s); cache holds {self.entries} "
            f"entries, {self.bytes_on_disk / 2**20:.1f} MiB ({per_entry / 1024:.1f} KiB per entry)"
        )


def prepcache(
    source: ChunkSource,
    centers_by_series: dict[str, list[tuple[float, float, float]]],
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> PrepcacheSummary:
    """Fill ``source``'s cache with the chunk of every centre, one scan per task."""
    assert source.cache is not None
    start = time.perf_counter()
    total = sum(len(c) for c in centers_by_series.values())
    cut = failed = 0
    failures: list[tuple[str, str]] = []
    tasks = [(source, uid, centers) for uid, centers in sorted(centers_by_series.items())]
    with tqdm(total=total, unit="cand", disable=not progress, desc="prepcache") as bar:
        # fork start-up is cheap and nothing here holds threads yet; spawn would
        # re-import numpy and SimpleITK in every worker.
        pool = multiprocessing.get_context("fork").Pool(num_workers) if num_workers > 0 else None
        with pool or contextlib.nullcontext():
            results = pool.imap_unordered(_fill_one, tasks) if pool else map(_fill_one, tasks)
            for uid, count, n_cut, error in results:
                cut += n_cut
                bar.update(count)
                if error:
                    failures.append((uid, error))
                    failed += count
    return PrepcacheSummary(
        scans=len(centers_by_series),
        candidates=total,
        cut=cut,
        failed=failed,
        entries=len(source.cache),
        bytes_on_disk=source.cache.volume(),
        seconds=time.perf_counter() - start,
        failures=tuple(sorted(failures)),
    )


def _fill_one(task) -> tuple[str, int, int, str | None]:
    source, uid, centers = task
    try:
        return uid, len(centers), source.fill_series(uid, centers), None
    except LunaError as err:
        return uid, len(centers), 0, str(err)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog("prepcache"),
        description="Cut the chunk of every candidate once and store it in the on-disk cache.",
    )
    add_data_arguments(parser)
    parser.add_argument("--num-workers", type=int, default=2, help="worker processes (0: in this process)")
    parser.add_argument("--series", nargs="+", metavar="UID", help="only these series (default: all on disk)")
    parser.add_argument("--max-series", type=int, help="only the first N series, in uid order (default: all)")
    parser.add_argument(
        "--compress-level", type=int, default=1, choices=range(0, 10), metavar="0-9",
        help="zstd level for cached chunks (0: uncompressed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (as -q)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = resolve_data_dir(args.data_dir, progress=progress_enabled(args))
    uids = data.series_uids
    if args.series:
        unknown = sorted(set(args.series) - set(uids))
        if unknown:
            raise LunaError(f"series not in data directory {data.root}: {', '.join(unknown)}")
        uids = sorted(args.series)
    if args.max_series:
        uids = uids[: args.max_series]
    centers: dict[str, list] = defaultdict(list)
    for info in load_candidate_infos(data.root, uids):
        centers[info.series_uid].append(info.center_xyz)
    if not centers:
        raise LunaError(f"no candidates for the selected scans in {data.root}: nothing to cache")
    cache_dir = resolve_cache_dir(args.cache_dir)
    log.info("caching %s chunks of %d candidates from %s into %s",
             "x".join(map(str, CHUNK_SHAPE)), sum(map(len, centers.values())), data.root, cache_dir)
    cache = ArrayCache(cache_dir, compress_level=args.compress_level)
    cache.remove_orphans()  # opens the cache here: an unwritable one is one error, not one per scan
    cache.close()  # the workers open their own connections
    source = ChunkSource(data, cache)
    summary = prepcache(source, dict(centers), num_workers=args.num_workers, progress=progress_enabled(args))
    print(summary)
    for uid, error in summary.failures:
        print(f"failed: {uid}: {error}")
    if summary.failures:
        raise LunaError(f"{len(summary.failures)} scan(s) could not be cached (listed above); fix or remove them and run again")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
