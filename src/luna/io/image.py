"""MetaImage (.mhd + .raw, .mha) and NIfTI (.nii, .nii.gz) files through SimpleITK.

`read_image` reads a whole file into a `Ct`; SimpleITK turns NIfTI's RAS into the
LPS patient space of DICOM and LUNA16. `read_image_region` reads only the voxels of
one chunk: ITK streams the region from uncompressed MetaImage files (LUNA16's
format), which makes a cold chunk read cost milliseconds instead of a whole-scan
load. `metaimage_files` names the files a scan is made of (a ``.mhd`` header and the
data file it points to), for the cache's source identity. `save_volume_image`
writes a CT-shaped volume with the CT's geometry.

What is checked before a voxel is used, because ITK reads these without a word:

- MetaImage headers (`check_metaimage`): NDims 3, a DimSize of at least
  `luna.io.formats.MIN_SLICES` slices, a scalar ElementType, finite spacing, origin
  and direction, one data file (not a LIST or a file pattern: ITK reads a LIST
  without names as zeros); and the data file's size. Uncompressed, it must be exactly
  DimSize x channels x element size bytes (after HeaderSize, or after the header of
  a ``.mha``): a DimSize of 96 48 46 on 96x96x46 data, or MET_UCHAR on 2-byte data,
  was read as a scrambled volume and diagnosed; a truncated file was reported as
  "No such file or directory". Compressed, it must be CompressedDataSize bytes when
  the header gives one (SimpleITK writes it); what ITK then still finds wrong
  comes through as its own message.
- What ITK's MetaImage reader prints instead of raising ("Uncompress failed",
  "data not read completely": it then returns an image of zeros) is an error
  naming the file; other formats' printed warnings are logged.
- Voxels of a floating-point image must be finite: NaN in a NIfTI file became 0 HU.
- A NIfTI voxel size (pixdim) must be finite and non-zero: ITK reads 0 or NaN as
  1 mm with a warning, and a 2.5 mm-slice scan was diagnosed at 1 mm slices.
- A geometry `Geometry` refuses (zero spacing, singular direction) is an error
  naming the file.

These functions are registered as formats in `luna.io.formats`; call them through
`luna.io.load_ct` / `luna.io.read_chunk`, which pick the reader by file name.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
import re
import struct
import sys
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import SimpleITK as sitk

from luna.ct import (
    AIR_HU,
    CHUNK_SHAPE,
    DEFAULT_HU_RANGE,
    Ct,
    chunk_start,
    clip_hu,
    crop,
)
from luna.errors import LunaError
from luna.fileio import replacing
from luna.geometry import Geometry
from luna.io.formats import CtFormat, check_fits_in_memory, check_regular_file, check_volume_size, register_format

__all__ = [
    "METAIMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "MetaImageHeader",
    "NiftiHeader",
    "check_metaimage",
    "check_nifti",
    "metaimage_files",
    "read_image",
    "read_image_header",
    "read_image_region",
    "read_metaimage_header",
    "read_nifti_header",
    "save_volume_image",
]

log = logging.getLogger(__name__)

METAIMAGE_SUFFIXES = (".mhd", ".mha")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    # MetaIO's LONG is 4 bytes whatever the platform (ITK reads MET_LONG as int32).
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
"""The scalar MetaImage element types and their size in bytes."""
HEADER_LIMIT = 1 << 20
"""A MetaImage header longer than this is not one (a binary file named .mhd)."""
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
"""NIfTI datatype codes of float voxels, whose values luna checks (ITK turns NaN into 0)."""
_CHUNK = 1 << 22  # bytes per read when streaming a data file

T = TypeVar("T")


def read_image(
    path: str | Path,
    *,
    series_uid: str | None = None,
    hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
) -> Ct:
    """Read a MetaImage or NIfTI file (anything SimpleITK reads as a 3D scalar image)."""
    path = Path(path)
    # The header first: a volume that is no CT, or too large to read here, is refused before a voxel is read.
    reader = _header_reader(path)
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise LunaError(
            f"{path}: a {reader.GetDimension()}D image with {reader.GetNumberOfComponents()} component(s) per "
            "voxel, but a CT is one 3D greyscale volume: save a single 3D volume in HU (one time point or channel "
            "of it) and run again"
        )
    check_volume_size(path, reader.GetSize()[::-1])
    check_fits_in_memory(path, reader.GetSize()[::-1])
    image = _itk(path, reader.Execute, "SimpleITK cannot read this image")
    geometry = _geometry(path, image)
    # A view of SimpleITK's buffer, not a copy: clip_hu makes the one copy we keep,
    # so loading peaks at twice the volume instead of three times.
    voxels = sitk.GetArrayViewFromImage(image)
    _check_finite(path, voxels)
    return Ct(
        hu=clip_hu(voxels, hu_range),
        geometry=geometry,
        series_uid=series_uid or _uid_from_name(path),
        source=str(path),
    )


def read_image_region(
    path: str | Path,
    center_xyz: Sequence[float],
    shape_irc: Sequence[int] = CHUNK_SHAPE,
    *,
    hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
) -> np.ndarray:
    """The chunk `Ct.crop` would give, read from an image file without loading all of it.

    ITK streams the region from uncompressed MetaImage files; other formats are read
    whole by ITK and cut, which is correct but not faster than `read_image`.
    """
    path = Path(path)
    reader = _header_reader(path)
    geometry = _geometry(path, reader)
    size_irc = np.array(reader.GetSize()[::-1])
    check_volume_size(path, size_irc)
    center_irc = geometry.xyz_to_irc(center_xyz)
    start, shape = chunk_start(center_irc, shape_irc)
    lo = np.clip(start, 0, size_irc)
    hi = np.clip(start + shape, 0, size_irc)
    if np.any(hi <= lo):
        return np.full(tuple(shape), AIR_HU, dtype=np.int16)
    reader.SetExtractIndex([int(v) for v in lo[::-1]])
    reader.SetExtractSize([int(v) for v in (hi - lo)[::-1]])
    region = sitk.GetArrayFromImage(_itk(path, reader.Execute, "cannot read the voxel data"))
    _check_finite(path, region)
    # Cut the region like the whole volume, with the centre moved into the region's
    # frame: the same padding and centring as `crop` on a loaded scan.
    return crop(clip_hu(region, hu_range), center_irc - lo, shape, repeat_slices=True)


def read_image_header(path: str | Path) -> tuple[tuple[int, int, int], Geometry]:
    """(shape irc, geometry) of an image file from its header alone, without reading voxels."""
    path = Path(path)
    reader = _header_reader(path)
    return tuple(int(v) for v in reader.GetSize()[::-1]), _geometry(path, reader)


def _header_reader(path: Path) -> sitk.ImageFileReader:
    """An ITK reader that has read ``path``'s header (after luna's own checks of the file)."""
    _check_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _itk(path, reader.ReadImageInformation, "cannot read the image header")
    return reader


def _check_file(path: Path) -> None:
    """The checks before ITK opens ``path``: a regular file whose header and data add up."""
    check_regular_file(path)
    if not path.exists():
        raise LunaError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(METAIMAGE_SUFFIXES):
        check_metaimage(path)
    elif name.endswith(NIFTI_SUFFIXES):
        check_nifti(path)


def _itk(path: Path, call: Callable[[], T], failed: str) -> T:
    """``call()`` (an ITK read of ``path``); what ITK raises or prints becomes one `LunaError`.

    ITK's MetaImage reader reports a failed decompression or a short read by
    printing to the process's stderr and returning an image of zeros, and its
    exception for a short read says "No such file or directory": the printed lines,
    when there are some, are the better reason.
    """
    try:
        with _native_stderr() as printed:
            result = call()
    except RuntimeError as err:
        reason = "; ".join(printed)[:300] or _first_line(err)
        raise LunaError(f"{path}: {failed} ({reason}); the file is damaged or truncated. Copy or export it again.") from None
    if printed:
        text = "; ".join(printed)[:300]
        if path.name.lower().endswith(METAIMAGE_SUFFIXES):
            raise LunaError(f"{path}: ITK could not read the voxel data ({text}); the data file is damaged. "
                            "Copy or download it again.")
        log.warning("%s: ITK: %s", path, text)
    return result


def _geometry(path: Path, image) -> Geometry:
    try:
        return Geometry.from_sitk(image)
    except ValueError as err:
        raise LunaError(f"{path}: the image's geometry is unusable ({err}); fix the header or export the scan again") from None


def _check_finite(path: Path, voxels: np.ndarray) -> None:
    if not np.issubdtype(voxels.dtype, np.floating):
        return
    finite = np.isfinite(voxels)
    if not finite.all():
        first = np.unravel_index(int(np.argmin(finite)), voxels.shape)
        raise LunaError(
            f"{path}: {int(finite.size - finite.sum())} voxel(s) are NaN or infinite (the first at "
            f"index, row, col {tuple(int(v) for v in first)}); a CT holds finite HU. Export the image again, "
            "or set those voxels to a value (e.g. -1000 for air) first."
        )


# -- MetaImage headers ---------------------------------------------------------------


@dataclass(frozen=True)
class MetaImageHeader:
    """What a MetaImage header says about its voxels (the fields luna checks)."""

    path: Path
    size_xyz: tuple[int, ...]
    """DimSize: voxels along x (columns), y (rows), z (slices)."""
    element_type: str
    channels: int
    data_file: Path
    """The voxel data's file: the header itself for ``LOCAL``."""
    data_offset: int
    """Bytes before the voxels in the data file; -1: the voxels end the file (HeaderSize = -1)."""
    compressed: bool
    compressed_size: int | None
    binary: bool

    @property
    def voxel_bytes(self) -> int:
        """The uncompressed size of the voxel data."""
        return math.prod(self.size_xyz) * self.channels * ELEMENT_BYTES[self.element_type]


def read_metaimage_header(path: str | Path) -> MetaImageHeader:
    """Parse and check a MetaImage header; `LunaError` naming the file and the field otherwise.

    MetaIO's ``key = value`` lines up to ElementDataFile, which ends the header (for a
    ``.mha`` the voxels follow it in the same file).
    """
    path = Path(path)
    fields, header_bytes = _metaimage_fields(path)
    where = f"{path}: not a usable MetaImage header"
    if header_bytes is None:
        raise LunaError(f"{where}: no ElementDataFile line (it ends a header); the file is damaged or not a MetaImage")

    def required(key: str) -> str:
        if key not in fields:
            raise LunaError(f"{where}: no {key} line; the file is damaged or not a MetaImage")
        return fields[key]

    def numbers(key: str, count: int, kind=float, *, default: str | None = None) -> tuple:
        text = fields.get(key, default) if default is not None else required(key)
        try:
            values = tuple(kind(v) for v in text.split())
        except ValueError:
            values = ()
        if len(values) != count or not all(math.isfinite(v) for v in values):
            raise LunaError(f"{where}: {key} = {text!r}, expected {count} finite {kind.__name__} value(s)")
        return values

    (ndims,) = numbers("NDims", 1, int)
    if ndims != 3:
        raise LunaError(f"{path}: NDims = {ndims}, but a CT is one 3D volume (NDims = 3): save a single 3D volume "
                        "(one time point of a 4D series; a stack of slices, not one) and run again")
    size = numbers("DimSize", 3, int)
    if min(size) < 0:
        raise LunaError(f"{where}: DimSize = {fields['DimSize']!r} has a negative size")
    element_type = required("ElementType")
    if element_type not in ELEMENT_BYTES:
        raise LunaError(
            f"{where}: ElementType = {element_type!r}; a CT's voxels are one of {', '.join(ELEMENT_BYTES)}"
        )
    (channels,) = numbers("ElementNumberOfChannels", 1, int, default="1")
    if channels < 1:
        raise LunaError(f"{where}: ElementNumberOfChannels = {channels}; a voxel has at least one value")
    for key in ("ElementSpacing", "ElementSize"):
        if key in fields and min(numbers(key, 3)) <= 0:
            raise LunaError(f"{where}: {key} = {fields[key]!r}; voxel sizes must be positive")
    for keys, count in ((("Offset", "Position", "Origin"), 3), (("TransformMatrix", "Rotation", "Orientation"), 9)):
        for key in keys:
            if key in fields:
                numbers(key, count)
    (offset,) = numbers("HeaderSize", 1, int, default="0")
    if offset < -1:
        raise LunaError(f"{where}: HeaderSize = {offset}; it is a byte count, or -1 for data at the file's end")
    compressed = _flag(fields.get("CompressedData", "False"))
    compressed_size = numbers("CompressedDataSize", 1, int)[0] if "CompressedDataSize" in fields else None
    data_file = _data_file(path, fields["ElementDataFile"])
    if data_file is None:
        # ITK reads a LIST without file names as zeros: refused rather than half-checked.
        raise LunaError(
            f"{path}: ElementDataFile = {fields['ElementDataFile']!r}: voxel data split over several files is "
            "not read; write the scan as one data file (e.g. SimpleITK.WriteImage to .mhd or .mha)"
        )
    if data_file == path:
        offset = header_bytes
    return MetaImageHeader(
        path, size, element_type, channels, data_file, offset, compressed, compressed_size,
        _flag(fields.get("BinaryData", "True")),
    )


def _metaimage_fields(path: Path) -> tuple[dict[str, str], int | None]:
    """The ``key = value`` lines up to ElementDataFile, and the header's length (None: no ElementDataFile)."""
    check_regular_file(path)
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_LIMIT)
    except FileNotFoundError:
        raise LunaError(f"{path}: no such file") from None
    except OSError as err:
        raise LunaError(f"{path}: cannot read ({err.strerror}); check the file and its permissions") from None
    fields: dict[str, str] = {}
    position = 0
    for raw_line in head.splitlines(keepends=True):
        position += len(raw_line)
        key, equals, value = raw_line.decode("latin-1").partition("=")
        if equals:
            fields.setdefault(key.strip(), value.strip())
        if key.strip() == "ElementDataFile":
            return fields, position
    return fields, None


def _data_file(path: Path, name: str) -> Path | None:
    """Where ``ElementDataFile = name`` puts the voxels: ``path`` itself for LOCAL, None for a LIST or a pattern."""
    if name == "LOCAL":
        return path
    if not name or name.split()[0] == "LIST" or "%" in name:
        return None
    return path.parent / name


def _flag(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes")


def check_metaimage(path: str | Path) -> MetaImageHeader:
    """`read_metaimage_header`, a CT-sized DimSize, and a data file of the size the header says."""
    header = read_metaimage_header(path)
    path = header.path
    check_volume_size(path, header.size_xyz[::-1])
    data = header.data_file
    if not header.binary:
        return header  # ASCII voxels: ITK checks them as it reads
    if data != path:
        check_regular_file(data)
        if not data.exists():
            raise LunaError(f"{path}: its voxel data file {data} is missing; copy it beside the header")
    available = data.stat().st_size - max(header.data_offset, 0)
    if header.compressed:
        needed, what = header.compressed_size, "CompressedDataSize"
        if needed is None:
            # ITK reads a truncated stream without a word: inflate it once to measure it
            # (once per file version: chunk reads check the header every time).
            stat = data.stat()
            inflated = _inflated_length(data, max(header.data_offset, 0), stat.st_size, stat.st_mtime_ns)
            if inflated != header.voxel_bytes:
                raise LunaError(
                    f"{data}: its compressed voxel data inflates to {inflated} bytes where {path}'s DimSize and "
                    f"ElementType need {header.voxel_bytes}; the header does not describe this data."
                )
            return header
    else:
        needed = header.voxel_bytes
        what = (f"DimSize {' x '.join(map(str, header.size_xyz))} of {header.element_type} "
                f"({ELEMENT_BYTES[header.element_type]} byte(s)"
                + (f", {header.channels} channels" if header.channels != 1 else "") + ")")
        if header.data_offset == -1 and available >= needed:
            return header  # HeaderSize = -1: the voxels are the file's last bytes
    if available < needed:
        raise LunaError(
            f"{data}: holds {available} bytes of voxel data where {path}'s {what} needs {needed}: the data "
            "file is truncated (or the header is wrong). Copy or download it again."
        )
    if available > needed:
        raise LunaError(
            f"{path}: the header's {what} makes {needed} bytes, but {data} holds {available}: the header "
            "does not describe this data (wrong DimSize or ElementType?). Use the header that came with the "
            "data, or correct it."
        )
    return header


# -- NIfTI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NiftiHeader:
    """What a NIfTI-1 or NIfTI-2 header says about its voxels (the fields luna checks)."""

    path: Path
    shape: tuple[int, ...]
    """dim[1..dim[0]]: x, y, z (and more)."""
    datatype: int
    bitpix: int
    vox_offset: int
    byte_order: str
    """'<' or '>'."""
    scl_slope: float
    scl_inter: float

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.bitpix // 8


def read_nifti_header(path: str | Path) -> NiftiHeader:
    """Parse a ``.nii`` / ``.nii.gz`` header; `LunaError` naming the file when it is not one."""
    path = Path(path)
    where = f"{path}: not a usable NIfTI file"
    try:
        with _open_nifti(path) as file:
            head = file.read(540)
    except (OSError, EOFError, zlib.error) as err:
        raise LunaError(f"{where} ({_reason(err)}); the file is damaged or not NIfTI. Export it again.") from None
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
        if size in (348, 540) and len(head) >= size:
            break
    else:
        raise LunaError(f"{where}: it does not start with a NIfTI-1 or NIfTI-2 header; the file is damaged or not NIfTI")
    if size == 348:
        magic = head[344:347]
        dims = struct.unpack(order + "8h", head[40:56])
        datatype, bitpix = struct.unpack(order + "hh", head[70:74])
        pixdim = struct.unpack(order + "8f", head[76:108])
        vox_offset = struct.unpack(order + "f", head[108:112])[0]
        slope, inter = struct.unpack(order + "ff", head[112:120])
    else:
        magic = head[4:7]
        datatype, bitpix = struct.unpack(order + "hh", head[12:16])
        dims = struct.unpack(order + "8q", head[16:80])
        pixdim = struct.unpack(order + "8d", head[104:168])
        vox_offset = struct.unpack(order + "q", head[168:176])[0]
        slope, inter = struct.unpack(order + "dd", head[176:192])
    if magic not in (b"n+1", b"n+2"):
        raise LunaError(f"{where}: its magic is {magic!r}, not that of a single-file NIfTI (.nii); convert it to .nii")
    if not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 0 or bitpix <= 0 or bitpix % 8:
        raise LunaError(f"{where}: dim {list(dims)} / bitpix {bitpix} describe no image; the header is damaged")
    if not math.isfinite(vox_offset) or vox_offset < size:
        raise LunaError(f"{where}: vox_offset {vox_offset} lies inside the header; the header is damaged")
    spacing = pixdim[1:min(dims[0], 3) + 1]
    if not all(math.isfinite(v) and v != 0 for v in spacing):
        # ITK reads a zero or NaN voxel size as 1 mm, with only a warning: a wrong geometry, silently
        shown = " x ".join(f"{v:g}" for v in spacing)
        raise LunaError(f"{where}: its voxel size (pixdim) is {shown} mm; every spatial voxel size must be "
                        "a finite non-zero number. The header is damaged: export the image again")
    for name, value in (("scl_slope", slope), ("scl_inter", inter)):
        if not math.isfinite(value):
            raise LunaError(f"{where}: {name} = {value}; the intensity scaling must be a finite number")
    return NiftiHeader(path, tuple(dims[1:dims[0] + 1]), datatype, bitpix, int(vox_offset), order, slope, inter)


def check_nifti(path: str | Path) -> NiftiHeader:
    """`read_nifti_header`, a data part as long as the header says, and finite float voxels.

    ITK reads a truncated ``.nii.gz`` without complaint (the missing voxels are 0)
    and turns NaN and infinite voxels into 0. An uncompressed file is checked by its
    size, a compressed one by the length gzip records at its end (one read of the
    whole stream when that disagrees, as a file of several gzip members may);
    float voxels are read and checked (one pass over the data).
    """
    header = read_nifti_header(path)
    path = header.path
    end = header.vox_offset + header.data_bytes
    dtype = NIFTI_FLOAT_TYPES.get(header.datatype)
    dtype = np.dtype(header.byte_order + dtype) if dtype is not None and header.bitpix == 8 * int(dtype[1]) else None
    compressed = path.name.lower().endswith(".gz")
    if dtype is None:
        if not compressed:
            length = path.stat().st_size
        elif _gzip_recorded_size(path) == end % (1 << 32):
            return header
        else:
            length = _scan(path, _gzip_chunks(path))[0]
    else:
        chunks = _gzip_chunks(path) if compressed else _file_chunks(path, 0)
        length, bad = _scan(path, chunks, header.vox_offset, dtype, header.data_bytes)
        if bad and length >= end:
            raise LunaError(
                f"{path}: {bad} voxel(s) are NaN or infinite; a CT holds finite HU. Export the image again, "
                "or set those voxels to a value (e.g. -1000 for air) first."
            )
    if length < end:
        raise LunaError(
            f"{path}: holds {max(length - header.vox_offset, 0)} bytes of voxel data where its header "
            f"({' x '.join(map(str, header.shape))} voxels of {header.bitpix} bits) needs {header.data_bytes}: "
            "the file is truncated. Copy or export it again."
        )
    return header


def _open_nifti(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _gzip_recorded_size(path: Path) -> int | None:
    """The uncompressed length (mod 2^32) a gzip file records in its last 4 bytes."""
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() < 18:
            return None
        file.seek(-4, os.SEEK_END)
        return struct.unpack("<I", file.read(4))[0]


def _gzip_chunks(path: Path) -> Iterator[bytes]:
    with gzip.open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            yield chunk


def _file_chunks(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as file:
        file.seek(offset)
        while chunk := file.read(_CHUNK):
            yield chunk


def _inflated_chunks(path: Path, offset: int) -> Iterator[bytes]:
    """A zlib (or gzip) stream from byte ``offset`` of ``path``, inflated; EOFError when it ends early."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # either header
    for chunk in _file_chunks(path, offset):
        yield inflater.decompress(chunk)
        if inflater.eof:
            return
    raise EOFError("the compressed stream ends before its end marker")


@functools.lru_cache(maxsize=64)
def _inflated_length(path: Path, offset: int, size: int, mtime_ns: int) -> int:
    """The inflated length of the zlib stream at ``offset`` of ``path`` (size and time key the cache)."""
    return _scan(path, _inflated_chunks(path, offset))[0]


def _scan(path: Path, chunks: Iterable[bytes], start: int = 0, dtype: np.dtype | None = None,
          count: int = 0) -> tuple[int, int]:
    """Read ``chunks`` to the end: (bytes in all, non-finite values among ``count`` bytes of ``dtype`` from ``start``).

    A stream that cannot be decompressed is a `LunaError` naming ``path``.
    """
    total = bad = 0
    pending = b""
    try:
        for chunk in chunks:
            if dtype is not None:
                lo, hi = max(start - total, 0), min(start + count - total, len(chunk))
                if hi > lo:
                    pending += chunk[lo:hi]
                    usable = len(pending) - len(pending) % dtype.itemsize
                    values = np.frombuffer(pending[:usable], dtype)
                    bad += values.size - int(np.count_nonzero(np.isfinite(values)))
                    pending = pending[usable:]
            total += len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise LunaError(f"{path}: the compressed data is damaged or truncated ({_reason(err)}). "
                        "Copy or export it again.") from None
    return total, bad


def _reason(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# -- what ITK prints ----------------------------------------------------------------------


@contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """The lines C++ code writes to file descriptor 2 inside the block.

    Python's own stderr is flushed first, so nothing of ours is caught. Where
    descriptor 2 cannot be redirected, nothing is captured.
    """
    printed: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield printed
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            printed.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def metaimage_files(path: str | Path) -> list[Path]:
    """The files a MetaImage scan is made of: the header and, for ``.mhd``, its data file."""
    path = Path(path)
    files = [path]
    if path.suffix.lower() == ".mhd":
        # Only the data file's name: a header the reader would refuse still has an identity.
        data = _data_file(path, _metaimage_fields(path)[0].get("ElementDataFile", "LOCAL"))
        if data is not None and data != path and data.is_file():
            files.append(data)
    return files


def save_volume_image(volume: np.ndarray, ct: Ct, path: str | Path, *, threshold: float | None = None) -> Path:
    """Write ``volume`` (CT-shaped) with ``ct``'s geometry; with ``threshold`` as a 0/1 uint8 mask.

    Without a threshold, integer volumes (label maps) keep their type, booleans become
    uint8 and anything else float32. ``.nii.gz`` / ``.mha`` overlay the CT in 3D Slicer
    or ITK-SNAP.
    """
    path = Path(path)
    if volume.shape != ct.hu.shape:
        raise ValueError(f"volume shape {volume.shape} differs from the CT's {ct.hu.shape}")
    if threshold is not None:
        data = (volume >= threshold).astype(np.uint8)
    elif volume.dtype == bool:
        data = volume.astype(np.uint8)
    elif np.issubdtype(volume.dtype, np.integer):
        data = volume
    else:
        data = volume.astype(np.float32)
    image = sitk.GetImageFromArray(data)
    ct.geometry.apply_to_sitk(image)
    try:
        with replacing(path) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=True)
    except (RuntimeError, OSError) as err:
        raise LunaError(f"{path}: cannot write the image ({err}); check the folder and free space") from None
    return path


def _uid_from_name(path: Path) -> str:
    """LUNA16 names each scan ``<series uid>.mhd``; for other files the stem stands in."""
    name = path.name
    for suffix in (*METAIMAGE_SUFFIXES, *NIFTI_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _first_line(err: Exception) -> str:
    """The description in an ITK exception: its "ITK ERROR: Class(0x...): ..." line, else its last line.

    ITK errors start with a source file/line banner; a matrix in the description
    spans several lines, of which the first says what is wrong.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        found = re.match(r"(?:ITK ERROR|sitk::ERROR):\s*(?:\w+\(0x[0-9a-f]+\):\s*)?(.*)", line)
        if found and found.group(1):
            reason = found.group(1)
            if lines[-1].startswith("Reason:") and lines[-1] != line:
                reason += " " + lines[-1]
            return reason
    return lines[-1] if lines else type(err).__name__


register_format(CtFormat("MetaImage", read_image, suffixes=METAIMAGE_SUFFIXES, read_region=read_image_region,
                         files=metaimage_files))
register_format(CtFormat("NIfTI", read_image, suffixes=NIFTI_SUFFIXES))
