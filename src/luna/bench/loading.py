"""CT loading: seconds per scan and memory per loaded scan, for MetaImage and DICOM.

MetaImage: the scans of the data dir as they are (``load_ct`` of the ``.mhd``).
DICOM: the first scan written once as a DICOM series (one file per slice, as a
scanner exports it) into the work dir, then read back with ``load_ct`` of the
folder. Memory: the RSS the loaded `Ct` keeps (its int16 volume) and the peak
increase while loading (reader buffers included).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from luna.bench.measure import MIB, PeakRss, stats
from luna.datadir import DataDir
from luna.io import load_ct

__all__ = ["bench_loading"]


def _timed_loads(path: Path, repeats: int) -> dict:
    seconds, peaks, kept = [], [], []
    ct = None
    for _ in range(repeats):
        del ct
        gc.collect()
        with PeakRss() as memory:
            start = time.perf_counter()
            ct = load_ct(path)
            seconds.append(time.perf_counter() - start)
        if memory.increase_mib is not None:
            peaks.append(memory.increase_mib)
        kept.append(ct.hu.nbytes / MIB)
    depth = ct.hu.shape[0]
    entry = {
        "shape_irc": list(ct.hu.shape),
        "seconds": stats(seconds),
        "seconds_per_100_slices": stats(s * 100 / depth for s in seconds),
        "volume_mib": kept[0],
    }
    if peaks:
        entry["peak_rss_increase_mib"] = stats(peaks)
    return entry


def bench_loading(data: DataDir, uids: list[str], work: Path, repeats: int) -> dict:
    """Load times and memory for ``uids`` as MetaImage and for ``uids[0]`` as DICOM."""
    from luna.synth.output import write_dicom_series

    result = {"metaimage": {uid: _timed_loads(data.scan_path(uid), repeats) for uid in uids}}
    raw = load_ct(data.scan_path(uids[0]), hu_range=None)
    folder = work / "dicom" / uids[0]
    write_dicom_series(
        folder, raw.hu, raw.geometry, uids[0], seed_text=f"bench {uids[0]}", patient_id="luna-bench",
        slice_thickness=float(raw.geometry.spacing_xyz[2]),
    )
    del raw
    files = sorted(folder.iterdir())
    result["dicom"] = {uids[0]: {**_timed_loads(folder, repeats), "files": len(files),
                                 "bytes": sum(f.stat().st_size for f in files)}}
    return result
