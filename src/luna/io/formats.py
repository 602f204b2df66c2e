"""The table of CT formats: which reader takes a path, and what it can do.

Every place that needs to know about file formats asks this table: `luna.io.load_ct`
(which reader), `luna.io.read_chunk` (can a chunk's region be read without the
whole scan), the cache's source identity (which files make up a scan) and the data
directory scan (which files are scans). A new format is one `register_format` call
at the bottom of the module that reads it (`luna.io.image`, `luna.io.dicom`); `luna.io`
imports every module of its package, so a new format is one new file ``luna/io/<name>.py``.

A format is either a *file* format, recognised by the end of the file name
(case-insensitive, longest suffix first: ``.nii.gz`` before ``.gz``), or a *folder*
format (DICOM series): a directory is read by the first folder format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from luna.ct import Ct
from luna.errors import LunaError

__all__ = ["CtFormat", "format_for", "register_format", "registered_formats", "scan_suffixes", "series_uid_from_path"]


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
    known = ", ".join(scan_suffixes())
    raise LunaError(
        f"{path}: not a CT luna reads; give a DICOM series folder or a file ending in {known}"
    )


def series_uid_from_path(path: str | Path) -> str:
    """LUNA16 names each scan ``<series uid>.mhd``: the name without its format's suffix.

    For names no format claims (and folders) the stem stands in.
    """
    path = Path(path)
    found = _matching_suffix(path.name) if not path.is_dir() else None
    return path.name[: -len(found[1])] if found else path.stem
