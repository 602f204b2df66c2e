"""The table of CT formats: which reader takes a path, and what it can do.

Every place that needs to know about file formats asks this table: `luna.io.load_ct`
(which reader), `luna.io.read_chunk` (can a chunk's region be read without the
whole scan), the cache's source identity (which files make up a scan) and the data
directory scan (which files are scans). A new format is one `register_format` call
at the bottom of the module that reads it (`luna.io.image`, `luna.io.dicom`); `luna.io`
imports every module of its package, so a new format is one new file ``luna/io/<name>.py``.

A format is either a *file* format, recognised by the end of the file name
(case-insensitive, longest suffix first: ``.nii.gz`` before ``.gz``), or a *folder*
format (DICOM series): a directory is read by the first folder format. A folder
format may also recognise one of its member files (``member``), so that a single
DICOM slice given where the series folder belongs gets "give the folder" instead
of "not a CT".

What every reader shares, beyond the table: `check_regular_file` (a named pipe is
never opened: that blocks until some writer comes), `check_volume_size` (a CT has
at least `MIN_SLICES` slices) and `check_fits_in_memory` (reading it fits in the
memory free now), which the readers of a whole volume apply to the header's size
before they read a voxel.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from luna.ct import Ct
from luna.errors import LunaError

__all__ = [
    "MIN_SLICES",
    "CtFormat",
    "check_regular_file",
    "available_memory_bytes",
    "check_fits_in_memory",
    "check_volume_size",
    "format_for",
    "register_format",
    "registered_formats",
    "scan_suffixes",
    "series_uid_from_path",
]

MIN_SLICES = 2
"""Fewer slices is not a CT volume: one slice has no distance to the next, so its 3D
geometry is made up (a DICOM slice's thickness, or 1 mm), and the diagnosis of such a
"scan" printed "no nodule found" for a 2D picture."""


@dataclass(frozen=True)
class CtFormat:
    """One CT format and its reader.

    ``read(path, series_uid=..., hu_range=..., **options) -> Ct`` reads a whole scan.
    ``read_region(path, center_xyz, shape_irc, hu_range=...) -> int16 chunk`` reads one
    chunk without loading the scan (None: the format cannot stream regions, callers
    load the scan). ``files(path)`` lists the files whose names, sizes and times
    identify the scan's content (default: the path itself, or every file under a
    folder). ``options`` names the keyword options ``read`` accepts beyond the
    common ones (e.g. DICOM's ``allow_gaps``).
    """

    name: str
    read: Callable[..., Ct]
    suffixes: tuple[str, ...] = ()
    folder: bool = False
    read_region: Callable[..., np.ndarray] | None = None
    files: Callable[[Path], list[Path]] | None = None
    options: tuple[str, ...] = ()
    member: Callable[[Path], bool] | None = None
    """For a folder format: whether a file is one member of such a folder (a DICOM slice)."""

    def source_files(self, path: Path) -> list[Path]:
        if self.files is not None:
            return self.files(path)
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.is_file())
        return [path]


_FORMATS: list[CtFormat] = []


def register_format(fmt: CtFormat) -> CtFormat:
    """Add ``fmt`` to the table (a later registration of the same name replaces it)."""
    _FORMATS[:] = [f for f in _FORMATS if f.name != fmt.name] + [fmt]
    return fmt


def registered_formats() -> tuple[CtFormat, ...]:
    return tuple(_FORMATS)


def scan_suffixes() -> tuple[str, ...]:
    """Every file suffix some format reads, longest first."""
    return tuple(sorted({s for f in _FORMATS for s in f.suffixes}, key=len, reverse=True))


def _matching_suffix(name: str) -> tuple[CtFormat, str] | None:
    lower = name.lower()
    for suffix in scan_suffixes():
        if lower.endswith(suffix):
            return next(f for f in _FORMATS if suffix in f.suffixes), suffix
    return None


def format_for(path: str | Path) -> CtFormat:
    """The format that reads ``path``; `LunaError` naming the known ones when none does."""
    path = Path(path)
    if path.is_dir():
        for fmt in _FORMATS:
            if fmt.folder:
                return fmt
    else:
        found = _matching_suffix(path.name)
        if found is not None:
            return found[0]
        if path.is_file():  # never a pipe: a member check reads the file
            for fmt in _FORMATS:
                if fmt.folder and fmt.member is not None and fmt.member(path):
                    raise LunaError(
                        f"{path}: one file of a {fmt.name}; give the folder that holds all of the "
                        f"series' files (here {path.parent}), not one of them"
                    )
    known = ", ".join(scan_suffixes())
    if not path.exists():
        raise LunaError(f"{path}: no such file or folder; give a DICOM series folder or a file ending in {known}")
    raise LunaError(
        f"{path}: not a CT luna reads; give a DICOM series folder or a file ending in {known}"
    )


def check_regular_file(path: Path) -> None:
    """`LunaError` when ``path`` exists but is not a regular file (after symbolic links).

    Readers call this before opening: opening a named pipe blocks until some other
    program writes to it (luna hung on one in a DICOM folder), and a folder or a
    device is never the file the user meant. A missing path passes, so that each
    reader says in its own words where the file was expected.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise LunaError(f"{path}: cannot read it ({err.strerror}); check the path and its permissions") from None
    if stat.S_ISDIR(mode):
        raise LunaError(f"{path}: a folder, where a file is expected; give the file itself")
    if not stat.S_ISREG(mode):
        raise LunaError(
            f"{path}: not a regular file (a named pipe, socket or device); copy the data into a file and give that"
        )


LOAD_BYTES_PER_VOXEL = 4
"""Reading a CT holds about two int16 copies at its peak (the reader's buffer and the clipped copy luna keeps)."""


def available_memory_bytes() -> int | None:
    """The memory free for a new allocation (Linux's ``MemAvailable``), or None where it cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_volume_size(path: str | Path, size_irc) -> None:
    """`LunaError` unless a volume of ``size_irc`` voxels is a CT: >= `MIN_SLICES` slices, no empty axis."""
    size = tuple(int(v) for v in size_irc)
    if len(size) != 3 or min(size) < 1:
        raise LunaError(f"{path}: the volume is {'x'.join(map(str, size))} voxels, it holds no image; "
                        "the file is damaged or not a CT, export the scan again")
    if size[0] < MIN_SLICES:
        raise LunaError(
            f"{path}: a single {size[1]}x{size[2]} slice, not a CT volume (at least {MIN_SLICES} slices "
            "are needed); give the whole series (for DICOM, the folder of all its slices)"
        )


def check_fits_in_memory(path: str | Path, size_irc) -> None:
    """`LunaError` unless reading ``size_irc`` voxels fits in the memory free now (`LOAD_BYTES_PER_VOXEL` each).

    For readers of a whole volume, from its header's size; a chunk read from a region
    of the file needs no room for the rest of it.

    A header whose size is wrong, or a volume far larger than a CT (100 slices of
    20000x20000: 80 GB), was read until the allocation failed, with "the file is
    damaged or truncated", or until the system killed the process.
    """
    size = tuple(int(v) for v in size_irc)
    need = int(np.prod(size, dtype=np.float64)) * LOAD_BYTES_PER_VOXEL
    free = available_memory_bytes()
    if free is not None and need > free:
        raise LunaError(
            f"{path}: {size[0]} slices of {size[1]}x{size[2]} voxels need about {need / 2**30:.1f} GiB to read, "
            f"but {free / 2**30:.1f} GiB of memory is free here (a chest CT is 512x512 by 100-1000 slices, "
            "0.1-1 GiB); if the header's size is right, read it on a machine with more memory or crop it"
        )


def series_uid_from_path(path: str | Path) -> str:
    """LUNA16 names each scan ``<series uid>.mhd``: the name without its format's suffix.

    For names no format claims (and folders) the stem stands in.
    """
    path = Path(path)
    found = _matching_suffix(path.name) if not path.is_dir() else None
    return path.name[: -len(found[1])] if found else path.stem
