"""Where the data is: the LUNA16 data directory, its scans, and the cache directory.

A data directory holds the CSVs at its top (``annotations.csv``,
``candidates.csv`` or ``candidates_V2.csv``, ``annotations_with_malignancy.csv``,
``annotations_excluded.csv``) and the scans as ``<series uid>.mhd`` (+ ``.raw``),
either in LUNA16's ``subset0`` .. ``subset9`` folders or flat. `DataDir.scan_path`
finds a scan by series uid without the caller knowing its subset.

Which directory (`resolve_data_dir`):

1. ``--data-dir`` if given, else the ``LUNA_DATA_DIR`` environment variable: it
   must exist and hold scans, or it is an error (never silently replaced).
2. Else ``data-unversioned/luna`` when it holds scans.
3. Else, when that folder is missing or empty, the built-in synthetic dataset in
   ``data-unversioned/synthetic`` (generated with the ``demo`` preset on first use),
   announced in one log line. A default folder that has files but no scans is
   broken, and an error.

A directory is synthetic (phantoms, not patients) when it, or a folder above it, holds
the marker ``synth.json`` that `luna.synth` writes last (`is_synthetic_path`); that
is how training records what its models learnt from and how a diagnosis knows
whether its CT is a phantom.

The cache directory is ``--cache-dir``, else ``LUNA_CACHE_DIR``, else
``data-unversioned/cache``. Paths are relative to the working directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from luna.errors import LunaError
from luna.io import scan_suffixes, series_uid_from_path

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DATA_DIR",
    "SYNTHETIC_DATA_DIR",
    "SYNTHETIC_MARKER",
    "DataDir",
    "find_scans",
    "is_synthetic_path",
    "resolve_cache_dir",
    "resolve_data_dir",
]

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data-unversioned/luna")
DEFAULT_CACHE_DIR = Path("data-unversioned/cache")
SYNTHETIC_DATA_DIR = Path("data-unversioned/synthetic")
SYNTHETIC_MARKER = "synth.json"
"""Written last into every dataset `luna.synth` generates (its ``MARKER``)."""


@dataclass(frozen=True)
class DataDir:
    """A LUNA16-layout data directory and the scans found in it."""

    root: Path
    scans: dict[str, Path] = field(repr=False, compare=False)
    """Series uid -> scan file."""
    is_synthetic: bool = False

    @classmethod
    def open(cls, root: str | os.PathLike, *, is_synthetic: bool = False) -> "DataDir":
        root = Path(root)
        if not root.is_dir():
            raise LunaError(f"data directory {root} does not exist; pass --data-dir or set LUNA_DATA_DIR")
        scans = find_scans(root)
        if not scans:
            raise LunaError(
                f"no scans found in data directory {root}: expected <series uid>.mhd files "
                f"in {root}/subset*/ or in {root} itself"
            )
        return cls(root, scans, is_synthetic or is_synthetic_path(root))

    @property
    def series_uids(self) -> list[str]:
        return sorted(self.scans)

    def scan_path(self, series_uid: str) -> Path:
        try:
            return self.scans[series_uid]
        except KeyError:
            raise LunaError(
                f"series {series_uid} is not in data directory {self.root} "
                f"({len(self.scans)} scans there); check the uid or download its subset"
            ) from None

    def csv_path(self, name: str) -> Path:
        """A CSV at the top of the data directory (it may not exist)."""
        return self.root / name


def find_scans(root: str | os.PathLike) -> dict[str, Path]:
    """Series uid -> scan file for the scans in ``root`` and ``root/subset*/``."""
    root = Path(root)
    scans: dict[str, Path] = {}
    folders = [root] + sorted(p for p in root.glob("subset*") if p.is_dir())
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name.lower().endswith(scan_suffixes()):
                uid = series_uid_from_path(path)
                if uid in scans:
                    log.warning("series %s is in both %s and %s; using the first", uid, scans[uid], path)
                    continue
                scans[uid] = path
    return scans


def is_synthetic_path(path: str | os.PathLike, levels: int = 4) -> bool:
    """Whether ``path`` (a data directory, a scan file or a DICOM folder) lies in a synthetic
    dataset: it or one of the ``levels`` folders above it holds `SYNTHETIC_MARKER`."""
    path = Path(path).absolute()
    folder = path if path.is_dir() else path.parent
    for candidate in [folder, *folder.parents][: levels + 1]:
        if (candidate / SYNTHETIC_MARKER).is_file():
            return True
    return False


def resolve_data_dir(data_dir: str | os.PathLike | None = None, *, progress: bool = True) -> DataDir:
    """The data directory a command should use (rules in the module docstring); ``progress``: a bar while the
    built-in dataset is generated."""
    explicit = data_dir if data_dir is not None else os.environ.get("LUNA_DATA_DIR") or None
    if explicit is not None:
        return DataDir.open(explicit)
    if DEFAULT_DATA_DIR.is_dir() and any(DEFAULT_DATA_DIR.iterdir()):
        return DataDir.open(DEFAULT_DATA_DIR)
    from luna.synth import ensure_dataset

    log.info(
        "No LUNA16 data in %s (set --data-dir or LUNA_DATA_DIR): using the built-in synthetic "
        "dataset in %s",
        DEFAULT_DATA_DIR,
        SYNTHETIC_DATA_DIR,
    )
    return DataDir.open(ensure_dataset(SYNTHETIC_DATA_DIR, "demo", progress=progress), is_synthetic=True)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``--cache-dir``, else ``LUNA_CACHE_DIR``, else ``data-unversioned/cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LUNA_CACHE_DIR") or DEFAULT_CACHE_DIR)
