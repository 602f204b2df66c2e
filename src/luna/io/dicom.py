"""Read a CT series from a folder of DICOM files into a `Ct`.

`read_dicom_series(folder)` returns the HU volume (int16, ``[index, row, col]``) and
its `Geometry`; `list_dicom_series(folder)` says which image series a folder holds.
The rules, in the order they are applied:

Finding the files
    The folder is searched recursively. Hidden files and folders (names starting
    with ``.``), ``DICOMDIR`` and anything that is not a regular file (a named pipe
    would block the reader) are skipped, as is anything that is not DICOM (e.g. the
    LIDC ``annotations.xml`` beside the slices): a file is DICOM when it has the
    ``DICM`` marker at byte 128, or, for old files without a preamble, when it
    starts with a group 0002/0008 tag and pydicom can parse it. A file that looks
    like DICOM (or is named ``*.dcm``) but cannot be read -- empty, cut off,
    unreadable for its permissions -- is an error naming it: it is likely a slice,
    and reading the series without it would leave a hole (or silently lose an end
    slice).
    Each header is parsed once, with the pixel data deferred: pydicom reads those
    bytes from the file only when the slice is decoded, so the other series of a
    folder cost no pixel reads and no file is parsed twice.

Choosing the series
    Files are grouped by SeriesInstanceUID. With several image series and no
    ``series_uid``, or a ``series_uid`` that is not there, the error lists the uids
    with their slice counts and descriptions.

Choosing the slices
    A file is an image slice when it has PixelData, ImagePositionPatient and
    ImageOrientationPatient, one frame and one sample per pixel. Localizers
    (ImageType contains LOCALIZER) are dropped, and so are slices whose orientation
    differs from the series' most common one (scouts that are not labelled as such).
    An image without position or orientation in a series of positioned slices is
    a malformed slice, an error naming it (not "missing slices"); so is an image
    object (an image SOP class, or Rows) without pixel data: pydicom reads a file cut
    off at an element boundary without complaint, and the slice would be lost.

Sorting
    Slices are sorted by ImagePositionPatient projected on the slice normal (the
    cross product of the row and column direction cosines), ascending, as ITK
    does; never by file name or InstanceNumber.

Checks (each error names the files or positions and the option that accepts it)
    - An image file whose position, orientation, PixelSpacing (positive) or
      rescale (finite, slope not 0) cannot be used is an error naming it (the
      series is not read with a hole where it was), also when no other slice is
      usable.
    - Rows, Columns and PixelSpacing must agree between slices.
    - Duplicates: slices at the same position are accepted only when they hold the
      same image (same HU values, e.g. a file copied twice); the copies are dropped
      with a warning. Different images at one position are an error: the series
      mixes acquisitions (respiratory phases, repeated scans) and must be split.
    - Missing slices: a gap more than 1.5x the median spacing (for an even count
      the lower middle value, which missing slices cannot inflate) is an error unless
      ``allow_gaps=True`` (``--allow-gaps``). Non-uniform spacing: a slice more than
      10% of the spacing away from where uniform spacing puts it is an error unless
      ``allow_nonuniform=True`` (``--allow-nonuniform``). Accepted series are stacked
      at the median spacing (positions past an irregularity are then off; a warning
      says by how much).
    - Gantry tilt: slices that shift in-plane steadily from one to the next (the
      slice-to-slice vector is not parallel to the normal) are an error unless
      ``allow_tilt=True`` (``--allow-tilt``); then the slice axis of the geometry is the actual
      slice-to-slice direction, so every slice keeps its exact position and the
      direction matrix is not orthogonal. In-plane jumps that are not a steady
      tilt are always an error (the folder mixes scans).

Geometry
    origin = ImagePositionPatient of the first sorted slice (centre of its first
    voxel); spacing = (column spacing, row spacing, median slice spacing), where
    DICOM's PixelSpacing is [row spacing, column spacing]; the direction matrix's
    columns are the row direction cosine (along column index i), the column
    direction cosine (along row index j) and the slice axis. Without tilt the slice
    axis is the exact normal, so the matrix is orthonormal as ITK's reader gives it.

Hounsfield units
    HU = stored * RescaleSlope + RescaleIntercept, per slice (they may differ;
    absent, they are 1 and 0; a slope of 0 is an error, not 1),
    computed in int32 (float64 for non-integer values). Before clipping to
    ``hu_range``, padding becomes air (-1000 HU): stored values equal to
    PixelPaddingValue (or between it and PixelPaddingRangeLimit), and any value
    that rescales to -2000 HU or less (scanners mark outside the field of view with
    -2000, -2048 or -3024 HU). Without this, ``hu_range=None`` or a range below
    -1000 would keep a ring of impossible densities around the body. SimpleITK
    keeps those values; elsewhere the voxels are the same as its reader's.

Compressed transfer syntaxes are decoded by pydicom when a decoder is installed
(``pip install "luna-nodule[dicom-codecs]"``, or python-gdcm); without one the error names
the file, the transfer syntax and these packages. What pydicom warns and logs while
luna reads (VR rule breaks, odd encodings, a traceback per failing decoder) is kept
at DEBUG: luna's one-line error says what failed.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.config import disable_value_validation
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from luna.ct import AIR_HU, DEFAULT_HU_RANGE, Ct, clip_hu
from luna.errors import LunaError
from luna.geometry import Geometry
from luna.io.formats import CtFormat, check_fits_in_memory, register_format

__all__ = ["DicomSeriesInfo", "is_dicom_file", "list_dicom_series", "read_dicom_series"]

log = logging.getLogger(__name__)

GAP_FACTOR = 1.5
"""A slice-to-slice distance above this multiple of the median means missing slices."""
SPACING_TOLERANCE = 0.1
"""How far (fraction of the spacing) a slice may lie from the uniform grid."""
IN_PLANE_TOLERANCE = 0.1
"""How far (fraction of a pixel) slices may shift in-plane before it counts as tilt."""
DUPLICATE_TOLERANCE_MM = 0.01
"""Slices closer than this along the normal are at the same position."""
ORIENTATION_TOLERANCE = 1e-3
"""Direction cosines that differ by less than this are the same orientation."""
OUTSIDE_FIELD_HU = -2000
"""Values at or below this are scanner padding (outside the field of view), not tissue."""
DEFER_SIZE = 16 * 1024
"""Element values larger than this (the pixel data) are read only when used."""
CODECS_HINT = (
    'pip install "luna-nodule[dicom-codecs]" (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg) '
    "or pip install python-gdcm"
)
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR, whatever its file name
DICOM_SUFFIXES = (".dcm", ".dicom")
"""Files named so are DICOM by intent: one that cannot be read is reported, not skipped."""
_LIST_LIMIT = 5  # files or gaps named in one message
_NO_POSITION = "image(s) without position/orientation"


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One image series in a folder, as `list_dicom_series` reports it."""

    series_uid: str
    slice_count: int
    """Image slices, localizers and non-image files not counted."""
    description: str
    """SeriesDescription, or '' when absent."""
    modality: str
    """Modality (e.g. 'CT'), or '' when absent."""
    folder: Path
    """The deepest folder that holds all of the series' image files."""

    def __str__(self) -> str:
        details = [f"{self.slice_count} slices", self.modality, repr(self.description) if self.description else ""]
        return f"{self.series_uid} ({', '.join(d for d in details if d)})"


def list_dicom_series(folder: str | Path) -> list[DicomSeriesInfo]:
    """The image series under ``folder`` (searched recursively), most slices first."""
    with _pydicom_quietly():
        scan = _scan_folder(Path(folder))
        return [series.info() for series in _image_series(scan)]


def read_dicom_series(
    folder: str | Path,
    series_uid: str | None = None,
    *,
    hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
    allow_gaps: bool = False,
    allow_nonuniform: bool = False,
    allow_tilt: bool = False,
) -> Ct:
    """Read one DICOM image series under ``folder`` as a `Ct` (see the module docs for the rules).

    ``series_uid`` is needed when the folder holds several image series.
    ``hu_range`` clips the HU (``None``: keep the scanner's values, padding still
    becomes -1000). The ``allow_*`` options accept missing slices, non-uniform
    spacing and gantry tilt, each with a warning.
    """
    with _pydicom_quietly():
        return _read_series(Path(folder), series_uid, hu_range, allow_gaps, allow_nonuniform, allow_tilt)


def _read_series(folder: Path, series_uid: str | None, hu_range: tuple[int, int] | None, allow_gaps: bool,
                 allow_nonuniform: bool, allow_tilt: bool) -> Ct:
    scan = _scan_folder(folder)
    if scan.unreadable:
        raise LunaError(
            f"{folder}: {_unreadable_note(scan)}. A damaged file is likely a slice of the series: copy or "
            "export it again, or move it out of the folder."
        )
    series = _choose_series(scan, series_uid)
    context = _Context(
        where=f"{folder}: series {series.uid}",
        allow_gaps=allow_gaps,
        allow_nonuniform=allow_nonuniform,
        allow_tilt=allow_tilt,
    )
    if series.malformed:
        raise LunaError(_malformed_message(*series.malformed[0]))
    for reason, count in Counter(reason for _, reason in series.dropped).items():
        log.info("%s: ignored %d file(s): %s", context.where, count, reason)

    slices = _sort(series.slices)
    _check_same_matrix(slices, context.where)
    slices = _drop_duplicates(slices, context.where)
    try:
        geometry = _geometry(slices, context)
    except ValueError as err:  # what Geometry refuses, e.g. a slice axis in the image plane
        raise LunaError(f"{context.where}: the slices give no usable geometry ({err}); export the series again") from None
    check_fits_in_memory(folder, (len(slices), slices[0].rows, slices[0].columns))
    return Ct(hu=_read_volume(slices, hu_range), geometry=geometry, series_uid=series.uid, source=str(folder))


def _malformed_message(path: Path, reason: str) -> str:
    return (
        f"{path}: cannot use this image's header ({reason}); the file is malformed. "
        "Move it out of the folder or export the series again."
    )


@dataclass(frozen=True)
class _Context:
    """What the checks need to know besides the slices: options, and how to name the series."""

    where: str
    allow_gaps: bool
    allow_nonuniform: bool
    allow_tilt: bool


# -- finding DICOM files -----------------------------------------------------------------


@dataclass
class _Scan:
    """Every DICOM header under a folder, grouped by series."""

    folder: Path
    series: dict[str, list[tuple[Path, Dataset]]] = field(default_factory=dict)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    other_files: int = 0
    """Files skipped as not DICOM (or DICOM without a series, such as DICOMDIR)."""


def _scan_folder(folder: Path) -> _Scan:
    if not folder.exists():
        raise LunaError(f"{folder}: no such folder; pass the folder that holds the DICOM series")
    if not folder.is_dir():
        raise LunaError(f"{folder}: not a folder; pass the folder that holds the DICOM series' files")
    scan = _Scan(folder)
    for path in _files_under(folder):
        looks_like = _sniff(path)
        if looks_like.startswith("unreadable:"):
            scan.unreadable.append((path, looks_like.partition(":")[2].strip()))
            continue
        if looks_like == "other":
            scan.other_files += 1
            continue
        meant = looks_like == "dicom" or path.suffix.lower() in DICOM_SUFFIXES
        try:
            dataset = pydicom.dcmread(path, force=True, defer_size=DEFER_SIZE)
            uid = str(dataset.get("SeriesInstanceUID", "") or "").strip()
        except Exception as err:  # pydicom raises many types on malformed input
            if meant:
                scan.unreadable.append((path, _one_line(err)))
            else:
                scan.other_files += 1
            continue
        if uid:
            scan.series.setdefault(uid, []).append((path, dataset))
        elif meant and not _is_directory_record(dataset):
            # pydicom parses cut-off files without complaint; what is left has no uid.
            scan.unreadable.append((path, "no SeriesInstanceUID: truncated or corrupt"))
        else:
            scan.other_files += 1
    return scan


def _is_directory_record(dataset: Dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    return meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def _files_under(folder: Path) -> list[Path]:
    """The regular files under ``folder`` (after links), hidden ones and DICOMDIR left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:  # a dangling link
                regular = False
            if regular:
                found.append(path)
            else:  # a named pipe would block the first read; sockets and devices are no slices
                log.debug("%s: skipped, not a regular file", path)
    return found


def _sniff(path: Path) -> str:
    """'dicom' for a file with the DICM marker, 'maybe' for one that starts like a bare dataset,
    'unreadable: <reason>' for one named like DICOM or that cannot be opened, else 'other'."""
    try:
        with open(path, "rb") as file:
            head = file.read(132)
    except OSError as err:
        return f"unreadable: {err.strerror}"
    if head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 8 and int.from_bytes(head[:2], "little") in (0x0002, 0x0008):
        return "maybe"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "unreadable: empty file" if not head else "unreadable: not DICOM (no DICM marker)"
    return "other"


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` (a regular file) is one DICOM file: named ``*.dcm`` or with the DICM marker."""
    return _sniff(Path(path)) in ("dicom", "maybe") or Path(path).suffix.lower() in DICOM_SUFFIXES


# -- choosing the series and its slices -------------------------------------------------------


@dataclass
class _Slice:
    """One image file of a series, with the header values the reader uses."""

    path: Path
    dataset: Dataset
    position: np.ndarray
    orientation: np.ndarray
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    """DICOM order: (row spacing, column spacing)."""
    slope: float
    intercept: float
    padding: tuple[int, int] | None
    """Stored values [low, high] that are padding, or None."""


@dataclass
class _Series:
    uid: str
    folder: Path
    description: str
    modality: str
    slices: list[_Slice]
    dropped: list[tuple[Path, str]]
    malformed: list[tuple[Path, str]]

    def info(self) -> DicomSeriesInfo:
        return DicomSeriesInfo(self.uid, len(self.slices), self.description, self.modality, self.folder)


def _image_series(scan: _Scan) -> list[_Series]:
    found = [_classify(uid, files) for uid, files in scan.series.items()]
    return sorted((s for s in found if s.slices), key=lambda s: (-len(s.slices), s.uid))


def _choose_series(scan: _Scan, series_uid: str | None) -> _Series:
    if series_uid is not None:
        series_uid = series_uid.strip()
        if series_uid in scan.series:
            chosen = _classify(series_uid, scan.series[series_uid])
            if chosen.slices:
                return chosen
            if chosen.malformed:
                raise LunaError(_malformed_message(*chosen.malformed[0]))
            reasons = _reason_counts(chosen.dropped + chosen.malformed)
            raise LunaError(
                f"{scan.folder}: series {series_uid} has no image slices ({reasons}); {_listing(scan)}"
            )
        raise LunaError(f"{scan.folder}: no series {series_uid!r} in this folder; {_listing(scan)}")
    images = _image_series(scan)
    if not images:
        malformed = [m for uid, files in scan.series.items() for m in _classify(uid, files).malformed]
        if malformed:  # e.g. PixelSpacing 0 on every slice: say so, not "no images"
            raise LunaError(_malformed_message(*malformed[0]))
        raise LunaError(_no_images_message(scan))
    if len(images) > 1:
        raise LunaError(
            f"{scan.folder} holds {len(images)} image series: {'; '.join(str(s.info()) for s in images)}. "
            "Pass the uid of the one to read (series_uid=..., on the command line --dicom-series UID)."
        )
    return images[0]


def _listing(scan: _Scan) -> str:
    images = _image_series(scan)
    if not images:
        return "the folder holds no image series"
    return "the image series there are: " + "; ".join(str(s.info()) for s in images) + ". Pass one of these uids."


def _no_images_message(scan: _Scan) -> str:
    files = [f for members in scan.series.values() for f in members]
    parts = [f"{scan.folder}: no DICOM image series found (searched recursively"]
    if files:
        dropped = [d for uid, members in scan.series.items() for d in _classify(uid, members).dropped]
        parts.append(f"; {len(files)} DICOM file(s), none a CT slice: {_reason_counts(dropped)}")
    if scan.other_files:
        parts.append(f"; {scan.other_files} other file(s) skipped")
    parts.append(")")
    if scan.unreadable:
        parts.append(f". {_unreadable_note(scan)}")
    if any("multi-frame" in r for uid, m in scan.series.items() for _, r in _classify(uid, m).dropped):
        parts.append(". Multi-frame (enhanced) DICOM is not supported: convert it to NIfTI (e.g. dcm2niix) and load that")
    else:
        parts.append(". Pass the folder that holds the CT's slice files")
    return "".join(parts)


def _unreadable_note(scan: _Scan) -> str:
    named = ", ".join(f"{path} ({reason})" for path, reason in scan.unreadable[:_LIST_LIMIT])
    more = f" and {len(scan.unreadable) - _LIST_LIMIT} more" if len(scan.unreadable) > _LIST_LIMIT else ""
    return f"{len(scan.unreadable)} file(s) that look like DICOM could not be read: {named}{more}"


def _reason_counts(items: list[tuple[Path, str]]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in Counter(r for _, r in items).most_common()) or "none"


def _classify(uid: str, files: list[tuple[Path, Dataset]]) -> _Series:
    """Split a series' files into image slices (majority orientation) and the rest, with reasons."""
    slices, dropped, malformed, unpositioned = [], [], [], []
    for path, dataset in files:
        try:
            if "PixelData" not in dataset and _is_image_object(dataset):
                # pydicom reads a file cut at an element boundary without complaint.
                malformed.append((path, "an image without pixel data: the file is cut off or damaged"))
                continue
            reason = _not_an_image(dataset)
            if reason == _NO_POSITION:
                unpositioned.append(path)
                continue
            if reason:
                dropped.append((path, reason))
                continue
            slices.append(_parse_slice(path, dataset))
        except Exception as err:  # pydicom decodes an element when it is first read, and raises many types on a
            # damaged one (NotImplementedError for a damaged value representation, found by the fuzz tests)
            malformed.append((path, _one_line(err)))
    if slices:
        keys = [tuple(np.round(s.orientation, 3)) for s in slices]
        majority = Counter(keys).most_common(1)[0][0]
        reference = slices[keys.index(majority)].orientation
        same = [np.abs(s.orientation - reference).max() <= ORIENTATION_TOLERANCE for s in slices]
        other = "image(s) in another orientation than the series' majority"
        dropped += [(s.path, other) for s, ok in zip(slices, same) if not ok]
        slices = [s for s, ok in zip(slices, same) if ok]
    # Beside positioned slices, an image without a position is a damaged slice.
    missing = "no ImagePositionPatient or ImageOrientationPatient, while the series' other slices have them"
    if slices or malformed:
        malformed += [(path, missing) for path in unpositioned]
    else:
        dropped += [(path, _NO_POSITION) for path in unpositioned]
    first = files[0][1]
    paths = [s.path for s in slices] or [p for p, _ in files]
    return _Series(
        uid=uid,
        folder=Path(os.path.commonpath([p.parent for p in paths])),
        description=_text(first, "SeriesDescription"),
        modality=_text(first, "Modality"),
        slices=slices,
        dropped=dropped,
        malformed=malformed,
    )


def _is_image_object(dataset: Dataset) -> bool:
    """An image by its SOP class (CT Image Storage, ...) or its image pixel module (Rows)."""
    sop_class = UID(str(dataset.get("SOPClassUID", "") or ""))
    return "Rows" in dataset or sop_class.name.endswith("Image Storage")


def _not_an_image(dataset: Dataset) -> str:
    """Why a dataset is not an image slice of a volume ('' when it is one)."""
    if "PixelData" not in dataset:
        return "without pixel data"
    modality = _text(dataset, "Modality").upper()
    if modality and modality != "CT":  # MR, PET, ...: no Hounsfield units, and a detector for CT would still answer
        return f"{modality} image(s), not CT"
    if _int(dataset, "NumberOfFrames", 1) > 1:
        return "multi-frame image(s)"
    if "ImagePositionPatient" not in dataset or "ImageOrientationPatient" not in dataset:
        return _NO_POSITION
    if _int(dataset, "SamplesPerPixel", 1) != 1:
        return "colour image(s)"
    image_type = dataset.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    if any(str(value).strip().upper() == "LOCALIZER" for value in image_type):
        return "localizer(s)"
    return ""


def _parse_slice(path: Path, dataset: Dataset) -> _Slice:
    position = np.array([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64)
    orientation = np.array([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
    pixel_spacing = tuple(float(v) for v in dataset.PixelSpacing)
    if position.shape != (3,) or orientation.shape != (6,) or len(pixel_spacing) != 2:
        raise ValueError("ImagePositionPatient, ImageOrientationPatient or PixelSpacing has the wrong number of values")
    if not (np.all(np.isfinite(position)) and np.all(np.isfinite(orientation))):
        raise ValueError("non-finite ImagePositionPatient or ImageOrientationPatient")
    if not (all(math.isfinite(v) for v in pixel_spacing) and min(pixel_spacing) > 0):
        raise ValueError(f"PixelSpacing {list(pixel_spacing)} is not two positive sizes in mm")
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    if np.linalg.norm(np.cross(row_cosine, column_cosine)) < 0.5:
        raise ValueError(f"ImageOrientationPatient {list(orientation)} is not two perpendicular directions")
    return _Slice(
        path=path,
        dataset=dataset,
        position=position,
        orientation=orientation,
        rows=int(dataset.Rows),
        columns=int(dataset.Columns),
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
        slope=_rescale(dataset, "RescaleSlope", 1.0),
        intercept=_rescale(dataset, "RescaleIntercept", 0.0),
        padding=_padding_range(dataset),
    )


def _rescale(dataset: Dataset, keyword: str, default: float) -> float:
    """RescaleSlope / RescaleIntercept; absent or empty is ``default``, unusable a ValueError.

    A slope of 0 turns every voxel into the intercept: an error, never read as 1.
    """
    value = dataset.get(keyword)
    if value is None or str(value).strip() == "":
        return default
    number = float(value)
    if not math.isfinite(number) or (keyword == "RescaleSlope" and number == 0):
        raise ValueError(f"{keyword} {value!s} is not a usable rescale")
    return number


def _padding_range(dataset: Dataset) -> tuple[int, int] | None:
    if dataset.get("PixelPaddingValue") is None:
        return None
    try:
        value = _as_stored(dataset.PixelPaddingValue, dataset)
        limit = dataset.get("PixelPaddingRangeLimit")
        limit = value if limit is None else _as_stored(limit, dataset)
    except (TypeError, ValueError):
        log.debug("ignoring unreadable PixelPaddingValue %r", dataset.get("PixelPaddingValue"))
        return None
    return min(value, limit), max(value, limit)


def _as_stored(value, dataset: Dataset) -> int:
    """A padding value as the decoded pixels hold it.

    Its VR is US or SS after PixelRepresentation, and files get that wrong (the
    LIDC-IDRI-0001 slices write -2000 as US 63536 for signed pixels), so the bit
    pattern is read with the pixels' signedness and BitsStored.
    """
    if isinstance(value, bytes):
        value = int.from_bytes(value[:2], "little" if dataset.original_encoding[1] else "big")
    value = int(value)
    bits = _int(dataset, "BitsStored", 16)
    if _int(dataset, "PixelRepresentation", 0) == 1:
        half = 1 << (bits - 1)
        return (value + half) % (1 << bits) - half
    return value % (1 << bits)


def _text(dataset: Dataset, keyword: str) -> str:
    """A descriptive text element, '' when absent or damaged (it only labels the series)."""
    try:
        return str(dataset.get(keyword, "") or "").strip()
    except Exception:  # a damaged element raises when decoded (see `_classify`)
        return ""


def _int(dataset: Dataset, keyword: str, default: int) -> int:
    try:
        return int(dataset.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


def _sort(slices: list[_Slice]) -> list[_Slice]:
    normal = _normal(slices[0])
    return sorted(slices, key=lambda s: (float(s.position @ normal), str(s.path)))


def _normal(slice_: _Slice) -> np.ndarray:
    row_cosine, column_cosine = _unit(slice_.orientation[:3]), _unit(slice_.orientation[3:])
    return _unit(np.cross(row_cosine, column_cosine))


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


# -- checks and geometry ----------------------------------------------------------------------


def _check_same_matrix(slices: list[_Slice], where: str) -> None:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise LunaError(
                f"{where}: slices differ in size: {s.path} is {s.rows}x{s.columns} pixels, "
                f"{first.path} is {first.rows}x{first.columns}. The folder mixes images of different "
                "reconstructions; move the odd files out."
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise LunaError(
                f"{where}: slices differ in PixelSpacing: {s.path} has {list(s.pixel_spacing)} mm, "
                f"{first.path} has {list(first.pixel_spacing)} mm. The folder mixes images of different "
                "reconstructions; move the odd files out."
            )


def _along_normal(slices: list[_Slice]) -> np.ndarray:
    return np.array([s.position for s in slices]) @ _normal(slices[0])


def _drop_duplicates(slices: list[_Slice], where: str) -> list[_Slice]:
    """Keep one of each group of slices at one position when they hold the same image."""
    along = _along_normal(slices)
    starts = np.concatenate([[0], np.nonzero(np.diff(along) >= DUPLICATE_TOLERANCE_MM)[0] + 1, [len(slices)]])
    kept = []
    for start, stop in zip(starts[:-1], starts[1:]):
        group = slices[start:stop]
        kept.append(group[0])
        if len(group) == 1:
            continue
        first = _slice_hu(group[0])
        differing = [s for s in group[1:] if not np.array_equal(_slice_hu(s), first)]
        if differing:
            names = ", ".join(str(s.path) for s in [group[0], *differing])
            raise LunaError(
                f"{where}: different images at the same position {_xyz(group[0])}: {names}. "
                "The series mixes several acquisitions (e.g. respiratory phases or repeated scans); "
                "move all but one of each position out of the folder."
            )
        log.warning(
            "%s: dropped %d duplicate(s) of %s (same position, same image): %s",
            where, len(group) - 1, group[0].path, ", ".join(str(s.path) for s in group[1:]),
        )
    return kept


def _geometry(slices: list[_Slice], context: _Context) -> Geometry:
    first = slices[0]
    row_cosine, column_cosine, normal = _unit(first.orientation[:3]), _unit(first.orientation[3:]), _normal(first)
    row_spacing, column_spacing = first.pixel_spacing
    origin = first.position
    if len(slices) == 1:
        spacing = (column_spacing, row_spacing, _single_slice_spacing(first.dataset))
        return Geometry(origin, spacing, np.column_stack([row_cosine, column_cosine, normal]).ravel())

    positions = np.array([s.position for s in slices])
    offsets = positions - origin
    along = offsets @ normal
    spacing = _median(np.diff(along))
    _check_spacing(slices, along, spacing, context)
    where = context.where

    slice_axis = normal
    in_plane = offsets - np.outer(along, normal)
    tolerance = IN_PLANE_TOLERANCE * min(row_spacing, column_spacing)
    if np.linalg.norm(in_plane, axis=1).max() > tolerance:
        steady = np.outer(along / along[-1], in_plane[-1])
        worst = int(np.argmax(np.linalg.norm(in_plane - steady, axis=1)))
        if np.linalg.norm(in_plane[worst] - steady[worst]) > tolerance:
            raise LunaError(
                f"{where}: slices jump in-plane: {slices[worst].path} at {_xyz(slices[worst])} is "
                f"{np.linalg.norm(in_plane[worst] - steady[worst]):.2f} mm off the line through "
                f"the first and last slice ({first.path}, {slices[-1].path}). The folder mixes scans "
                "with different fields of view; move the odd files out."
            )
        slice_axis = _unit(offsets[-1])
        angle = np.degrees(np.arccos(min(1.0, float(slice_axis @ normal))))
        if not context.allow_tilt:
            raise LunaError(
                f"{where}: the gantry is tilted by {angle:.2f} degrees: slice positions move "
                f"{np.linalg.norm(in_plane[-1]):.2f} mm in-plane from {first.path} to {slices[-1].path}. "
                "Pass --allow-tilt (allow_tilt=True in Python) to read it with a sheared (non-orthogonal) "
                "geometry that keeps every slice's true position."
            )
        log.warning("%s: gantry tilt of %.2f degrees; the slice axis follows the slices", where, angle)
        spacing = _median(np.diff(positions, axis=0) @ slice_axis)
    direction = np.column_stack([row_cosine, column_cosine, slice_axis]).ravel()
    return Geometry(origin, (column_spacing, row_spacing, spacing), direction)


def _check_spacing(slices: list[_Slice], along: np.ndarray, spacing: float, context: _Context) -> None:
    where, gaps = context.where, np.diff(along)
    missing = np.nonzero(gaps > GAP_FACTOR * spacing)[0]
    if missing.size:
        described = "; ".join(
            f"{gaps[i]:.4g} mm between {slices[i].path.name} at {_xyz(slices[i])} and "
            f"{slices[i + 1].path.name} at {_xyz(slices[i + 1])}"
            for i in missing[:_LIST_LIMIT]
        )
        more = f" and {missing.size - _LIST_LIMIT} more" if missing.size > _LIST_LIMIT else ""
        message = f"{where}: missing slices: {described}{more}, while the median spacing is {spacing:.4g} mm"
        if not context.allow_gaps:
            raise LunaError(
                f"{message}. Copy or export the complete series, or pass --allow-gaps (allow_gaps=True in "
                f"Python) to stack the slices at {spacing:.4g} mm anyway (positions past a gap are then off by "
                "the missing slices)."
            )
        log.warning("%s; stacking them at the median spacing (allow_gaps)", message)

    # Within each run of slices between gaps, compare positions with a uniform grid:
    # this also catches spacings that drift a little from slice to slice.
    deviation = np.zeros(len(slices))
    for run in np.split(np.arange(len(slices)), missing + 1):
        deviation[run] = along[run] - along[run[0]] - spacing * np.arange(len(run))
    worst = int(np.argmax(np.abs(deviation)))
    if abs(deviation[worst]) > SPACING_TOLERANCE * spacing:
        message = (
            f"{where}: non-uniform slice spacing: slice-to-slice distances range from {gaps.min():.4g} to "
            f"{gaps.max():.4g} mm (median {spacing:.4g} mm); {slices[worst].path.name} at {_xyz(slices[worst])} "
            f"lies {abs(deviation[worst]):.3g} mm from where uniform spacing puts it"
        )
        if not context.allow_nonuniform:
            raise LunaError(
                f"{message}. Pass --allow-nonuniform (allow_nonuniform=True in Python) to stack the slices at "
                "the median spacing anyway (positions are then off by up to that much), or resample the series."
            )
        log.warning("%s; stacking them at the median spacing (allow_nonuniform)", message)


def _median(values: np.ndarray) -> float:
    """The median; for an even count the lower middle value, so that missing slices cannot inflate it."""
    return float(np.percentile(values, 50, method="lower"))


def _single_slice_spacing(dataset: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(dataset.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return 1.0


def _xyz(slice_: _Slice) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in slice_.position) + ") mm"


# -- pixels ----------------------------------------------------------------------------------


def _read_volume(slices: list[_Slice], hu_range: tuple[int, int] | None) -> np.ndarray:
    volume = np.empty((len(slices), slices[0].rows, slices[0].columns), dtype=np.int16)
    for k, s in enumerate(slices):
        volume[k] = clip_hu(_slice_hu(s), hu_range)
        # All headers live until the read returns; free this slice's pixel bytes now.
        del s.dataset.PixelData
    return volume


def _slice_hu(slice_: _Slice) -> np.ndarray:
    """One slice in HU (int32, or float64 for a non-integer rescale), padding set to air."""
    stored = _decode(slice_)
    if float(slice_.slope).is_integer() and float(slice_.intercept).is_integer():
        hu = stored.astype(np.int32)
        if slice_.slope != 1:
            hu *= int(slice_.slope)
        hu += int(slice_.intercept)
    else:
        hu = stored * slice_.slope + slice_.intercept
    air = hu <= OUTSIDE_FIELD_HU
    if slice_.padding is not None:
        low, high = slice_.padding
        air |= (stored >= low) & (stored <= high)
    hu[air] = AIR_HU
    return hu


def _decode(slice_: _Slice) -> np.ndarray:
    dataset = slice_.dataset
    syntax = _transfer_syntax(dataset)
    try:
        stored = decode_pixels(dataset)
    except MemoryError:
        raise
    except Exception as err:  # decoders raise ValueError, RuntimeError, NotImplementedError, OSError...
        raise LunaError(_decode_error(slice_.path, syntax, err)) from None
    if stored.shape != (slice_.rows, slice_.columns):
        raise LunaError(
            f"{slice_.path}: pixel data has shape {stored.shape}, the header says "
            f"{slice_.rows}x{slice_.columns}; the file is corrupt. Copy or export it again."
        )
    return stored


class _ToDebug(logging.Filter):
    """Drops a record from its logger and logs its message again at DEBUG on luna's."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("pydicom: %s", record.getMessage())
        return False


@contextmanager
def _pydicom_quietly() -> Iterator[None]:
    """Keep pydicom's warnings and logged tracebacks off the user's screen during a read.

    pydicom warns about every value that breaks a VR rule (files from real scanners
    often do; the values are read all the same), logs "Expected explicit VR, but
    found implicit VR" for odd encodings, and logs each failing decoder plugin's
    exception with its traceback before raising one error naming them all, which
    luna turns into its own message. A user saw screens of these before luna's one
    line; they are kept at DEBUG on luna's logger.
    """
    quiet = _ToDebug()
    loggers = [logging.getLogger("pydicom"), logging.getLogger("pydicom.pixels.decoders.base")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with disable_value_validation():
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _transfer_syntax(dataset: Dataset) -> UID:
    """The file's transfer syntax; files without a meta header get one from how they were parsed."""
    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        meta = dataset.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = dataset.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return UID(str(meta.TransferSyntaxUID))


def _decode_error(path: Path, syntax: UID, err: Exception) -> str:
    reason = _one_line(err)
    if not syntax.is_transfer_syntax or syntax.is_compressed:  # is_compressed raises for other UIDs
        name = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
        if not _decoder_available(syntax):
            return (
                f"{path}: its pixel data is compressed as {name} and no decoder for it is installed. "
                f"Install one with {CODECS_HINT}, or decompress the files first (e.g. gdcmconv --raw)."
            )
        return (
            f"{path}: cannot decode its {name} pixel data ({reason}). The file may be corrupt; if other "
            f"software reads it, another decoder may: {CODECS_HINT}."
        )
    return f"{path}: cannot read its pixel data ({reason}); the file is truncated or corrupt. Copy or export it again."


def _decoder_available(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def _one_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines)[:300] if lines else type(err).__name__


register_format(CtFormat("DICOM series", read_dicom_series, folder=True,
                         options=("allow_gaps", "allow_nonuniform", "allow_tilt"), member=is_dicom_file))
