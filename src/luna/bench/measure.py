"""What every benchmark section measures with: the machine, repeat statistics, memory, profiles.

- `machine` describes where the numbers come from (CPU model, cores, GPU, versions);
- `stats` turns repeated measurements into median, min and max, so noise shows;
- `PeakRss` gives the peak resident memory of a block of code (Linux: the kernel's
  high-water mark, reset at the start of the block through ``/proc/self/clear_refs``);
- `gpu_peak` does the same for CUDA memory;
- `top_costs` names the functions a cProfile run spent its time in.
"""

from __future__ import annotations

import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = ["PeakRss", "gpu_peak", "machine", "profile_text", "rate", "stats", "top_costs"]

MIB = 2**20


def stats(values: Iterable[float]) -> dict:
    """Median with min and max over repeats (``runs`` of them)."""
    values = list(values)
    if not values:
        raise ValueError("no measurements")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def rate(count: float, seconds: float) -> float:
    """``count / seconds``; infinite for a zero duration rather than a crash."""
    return count / seconds if seconds > 0 else float("inf")


def machine() -> dict:
    """The CPU, core count, threads, GPU and library versions the figures were measured with."""
    info = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_bf16": _cpu_bf16(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported(),
        }
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_bf16() -> bool | None:
    """Whether oneDNN runs bfloat16 natively here (else CPU autocast emulates it slowly)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRss:
    """Peak resident memory of the process while the ``with`` block runs.

    After the block: ``before_mib`` (RSS when it started), ``peak_mib`` (the highest
    RSS during it) and ``increase_mib`` (their difference: what the block needed on
    top of what the process already held). Linux only: elsewhere the values stay None.
    """

    def __init__(self) -> None:
        self.before_mib: float | None = None
        self.peak_mib: float | None = None
        self._supported = False

    def __enter__(self) -> "PeakRss":
        before = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:  # "5": reset the high-water mark to the RSS
                f.write("5")
            self._supported = before is not None
        except OSError:
            self._supported = False
        self.before_mib = before / 1024 if self._supported else None
        return self

    def __exit__(self, *exc) -> None:
        if self._supported:
            hwm = _status_kib("VmHWM")
            self.peak_mib = hwm / 1024 if hwm is not None else None

    @property
    def increase_mib(self) -> float | None:
        if self.peak_mib is None or self.before_mib is None:
            return None
        return max(self.peak_mib - self.before_mib, 0.0)


def gpu_peak(device: torch.device, run: Callable[[], object]) -> tuple[object, float | None]:
    """``run()``'s result and the peak CUDA memory it allocated (MiB; None off CUDA)."""
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = run()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) / MIB


def top_costs(profiler: cProfile.Profile, count: int = 5) -> list[dict]:
    """The ``count`` functions with the most time spent in themselves (cProfile's tottime)."""
    rows = []
    table = pstats.Stats(profiler).stats
    total = sum(entry[2] for entry in table.values()) or 1.0
    for (filename, line, name), entry in table.items():
        calls, tottime, cumtime = entry[1], entry[2], entry[3]
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        rows.append({"function": where, "calls": calls, "seconds": tottime, "share": tottime / total,
                     "cumulative_seconds": cumtime})
    rows.sort(key=lambda r: -r["seconds"])
    return rows[:count]


def profile_text(profiler: cProfile.Profile, title: str, lines: int = 30) -> str:
    """A cProfile summary: the top functions by own time, then by cumulative time."""
    out = io.StringIO()
    out.write(f"{title}\n\n")
    for key in ("tottime", "cumulative"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(lines)
        out.write(f"== sorted by {key} ==\n{stream.getvalue()}\n")
    return out.getvalue()


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("luna", "torch", "scipy", "numpy"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
    return Path(filename).name
