"""What the benchmark scripts share: the machine description and median/min/max records."""

from __future__ import annotations

import os
import platform
import statistics
import sys

import torch


def stats(values) -> dict:
    """Median with min and max, so the noise between repeats is visible."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
