"""Reading CTs and the LUNA16 files: one entry point per job, one format table behind them.

- `load_ct(path)`: a MetaImage (``.mhd`` + ``.raw``, ``.mha``) or NIfTI (``.nii``,
  ``.nii.gz``) file, or a DICOM series folder, into a `luna.ct.Ct`;
- `read_chunk(path, center_xyz)`: the chunk `Ct.crop` would give, reading only its
  region where the format allows (uncompressed MetaImage, as in LUNA16);
- `luna.io.formats`: the table of formats (`register_format` adds one);
- `luna.io.image`, `luna.io.dicom`: the readers;
- `luna.io.luna16`: the LUNA16 CSV schema (annotations, candidates, results).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
from pathlib import Path
from typing import Sequence

import numpy as np

from luna.ct import CHUNK_SHAPE, DEFAULT_HU_RANGE, Ct
from luna.errors import LunaError
from luna.io.formats import (
    CtFormat,
    check_volume_size,
    format_for,
    register_format,
    registered_formats,
    scan_suffixes,
    series_uid_from_path,
)

# Every module of this package registers the formats it reads when imported (see luna.io.formats).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CtFormat", "format_for", "load_ct", "read_chunk", "register_format", "scan_suffixes", "series_uid_from_path", "source_identity"]


def load_ct(
    path: str | Path,
    *,
    series_uid: str | None = None,
    hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
    **options,
) -> Ct:
    """Read a CT from an image file or a DICOM series folder.

    ``series_uid`` picks the series in a DICOM folder that holds several; for an
    image file it overrides the uid taken from the file name. ``options`` are the
    format's own (DICOM: ``allow_gaps``, ``allow_nonuniform``, ``allow_tilt``; see
    `luna.io.dicom`); another format's options are ignored when false and an error
    when set, so that a command can pass its options whatever the user gives. Every
    format's CT has at least `luna.io.formats.MIN_SLICES` slices.
    """
    path = Path(path)
    fmt = format_for(path)
    known = {name for f in registered_formats() for name in f.options}
    if set(options) - known:
        raise TypeError(f"no CT format has the option(s) {sorted(set(options) - known)}")
    misplaced = sorted(name for name, value in options.items() if value and name not in fmt.options)
    if misplaced:
        owners = sorted({f.name for f in registered_formats() for name in misplaced if name in f.options})
        raise LunaError(
            f"{path}: {', '.join(misplaced)} (--{', --'.join(n.replace('_', '-') for n in misplaced)}) "
            f"appl{'ies' if len(misplaced) == 1 else 'y'} to {' and '.join(owners)} input only, not to a {fmt.name} file"
        )
    options = {name: value for name, value in options.items() if name in fmt.options}
    ct = fmt.read(path, series_uid=series_uid, hu_range=hu_range, **options)
    check_volume_size(path, ct.hu.shape)
    return ct


def read_chunk(
    path: str | Path,
    center_xyz: Sequence[float],
    shape_irc: Sequence[int] = CHUNK_SHAPE,
    *,
    hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
) -> np.ndarray:
    """The chunk `Ct.crop` would give; only its region is read when the format streams."""
    path = Path(path)
    fmt = format_for(path)
    if fmt.read_region is not None:
        return fmt.read_region(path, center_xyz, shape_irc, hu_range=hu_range)
    return load_ct(path, hu_range=hu_range).crop(center_xyz, shape_irc)


def source_identity(path: str | os.PathLike) -> str:
    """A short id that changes when the scan at ``path`` (a file or a folder) changes.

    Built from the names, sizes and modification times of the files its format says
    it is made of (a MetaImage header with its data file; every file of a DICOM
    folder), not from contents: hashing 120 GB of scans to key a cache would cost
    more than the cache saves.
    """
    path = Path(path)
    try:
        files = format_for(path).source_files(path)
    except LunaError:  # a file no format claims: itself
        files = [path]
    digest = hashlib.sha1()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
