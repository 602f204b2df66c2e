"""LIDC-IDRI readings: the radiologists' XML (outlines, ratings) and their masks on a CT.

Each LIDC-IDRI scan comes with one XML file (``LidcReadMessage``, namespace
``http://www.nih.gov``) holding up to four ``readingSession`` elements, one per
radiologist. A session lists

- ``unblindedReadNodule``: a nodule as this reader saw it, with a reader-specific
  ``noduleID`` (the same nodule has different ids in different sessions), optional
  ``characteristics`` (subtlety, internalStructure, calcification, sphericity,
  margin, lobulation, spiculation, texture, malignancy; integers, absent for
  nodules < 3 mm) and one ``roi`` per slice: ``imageZposition`` (mm),
  ``imageSOP_UID``, ``inclusion`` (``TRUE``; ``FALSE`` outlines a hole to cut out
  of the nodule on that slice) and the outline as ``edgeMap`` points, ``xCoord``
  the column and ``yCoord`` the row in the slice's pixel grid. Nodules < 3 mm have
  a single point.
- ``nonNodule``: a finding that is not a nodule, one ``locus`` point on one slice.

`read_lidc_xml` parses a file into frozen records (`LidcReadMessage`, `LidcReading`,
`LidcNodule`, `LidcRoi`, `LidcNonNodule`). Tags are matched by local name, so files
with or without the namespace read the same; numbers may carry whitespace
(``-125.000000 ``). A missing file, malformed XML or a number that does not parse
raises `LunaError` naming the file (and the element).

`roi_mask` rasterises one reader's nodule into a CT's voxel grid. Each ROI goes to
the slice whose patient z lies within half a slice spacing of ``imageZposition``
(through the CT's `Geometry`, which is right for axial series; the shared slabs
have no SOP UIDs in their `Ct`), and ROIs outside the volume are skipped, so a slab
gets the part of the nodule it holds. Outline convention: the edge-map points are
pixels on the outline, joined in order and closed; the polygon is filled by the
even-odd rule at pixel centres. ``include_outline=True`` (the default) counts the
outline pixels as nodule. As we read the LIDC protocol, readers were asked to draw
the outline just outside the nodule; ``include_outline=False`` follows that reading
(masks one pixel thinner all round: on LIDC-IDRI-0001's large nodule the readers'
masks lose 14 % of their voxels). Holes (``inclusion`` FALSE) are cut out after
all of a slice's inclusions are drawn, with the same convention for their outline
pixels. ``dice_per_slice`` on that nodule, our `luna.masks.nodule_mask` against the
readers' majority: 0.77 mean with outlines included, 0.83 without.

`nodules_near` finds the readers' nodules around a point (the same physical nodule
across readers); `dice_per_slice` and `compare_with_readers` measure how a mask
agrees with the readers per slice, against each reader, their union and a
majority (>= 2 readers).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from luna.ct import Ct
from luna.errors import LunaError
from luna.geometry import Geometry

__all__ = [
    "LidcNodule",
    "LidcNonNodule",
    "LidcReadMessage",
    "LidcReading",
    "LidcRoi",
    "compare_with_readers",
    "dice_per_slice",
    "nodule_center_xyz",
    "nodules_near",
    "read_lidc_xml",
    "roi_mask",
]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class LidcRoi:
    """One outline of a nodule on one slice."""

    z_mm: float
    sop_uid: str
    inclusion: bool
    """False: the outline marks a hole, cut out of the nodule on this slice."""
    points_rc: np.ndarray = field(repr=False)
    """(N, 2) int (row, col) pixels of the outline, in drawing order."""


@dataclass(frozen=True)
class LidcNodule:
    """One reader's view of one nodule."""

    nodule_id: str
    malignancy: int | None
    characteristics: dict[str, int] = field(repr=False)
    rois: tuple[LidcRoi, ...] = field(repr=False)

    @property
    def z_range_mm(self) -> tuple[float, float]:
        zs = [roi.z_mm for roi in self.rois]
        return (min(zs), max(zs)) if zs else (math.nan, math.nan)


@dataclass(frozen=True)
class LidcNonNodule:
    """A finding the reader judged not to be a nodule (one point)."""

    non_nodule_id: str
    z_mm: float
    sop_uid: str
    locus_rc: tuple[int, int]


@dataclass(frozen=True)
class LidcReading:
    """One radiologist's reading session."""

    reader_id: str
    nodules: tuple[LidcNodule, ...]
    non_nodules: tuple[LidcNonNodule, ...] = ()


@dataclass(frozen=True)
class LidcReadMessage:
    """One LIDC XML file: the scan it reads and the readers' sessions."""

    source: str
    series_uid: str
    study_uid: str
    readings: tuple[LidcReading, ...]


# --------------------------------------------------------------------------- parsing


def read_lidc_xml(path: str | Path) -> LidcReadMessage:
    """Parse an LIDC-IDRI XML reading file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise LunaError(f"{path}: no such LIDC XML file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise LunaError(f"{path}: not well-formed XML ({err}); the file may be truncated") from None
    except OSError as err:
        raise LunaError(f"{path}: cannot read ({err.strerror})") from None
    if _local(root.tag) != "LidcReadMessage":
        raise LunaError(f"{path}: root element is <{_local(root.tag)}>, not an LIDC <LidcReadMessage>")
    parser = _Parser(path)
    header = _child(root, "ResponseHeader")
    return LidcReadMessage(
        source=str(path),
        series_uid=_text(header, "SeriesInstanceUid") if header is not None else "",
        study_uid=_text(header, "StudyInstanceUID") if header is not None else "",
        readings=tuple(parser.reading(session) for session in _children(root, "readingSession")),
    )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _text(element: ET.Element | None, name: str, default: str = "") -> str:
    child = _child(element, name) if element is not None else None
    if child is None or child.text is None:
        return default
    return child.text.strip()


class _Parser:
    """Element -> record conversions that name the file in their errors."""

    def __init__(self, path: Path):
        self.path = path

    def number(self, element: ET.Element | None, name: str, kind=float, where: str = ""):
        text = _text(element, name)
        try:
            return kind(float(text)) if kind is int else kind(text)
        except (ValueError, OverflowError):
            context = f" in {where}" if where else ""
            raise LunaError(
                f"{self.path}: <{name}>{context} is {text!r}, not a number; "
                "the XML is not a valid LIDC reading"
            ) from None

    def reading(self, session: ET.Element) -> LidcReading:
        reader_id = _text(session, "servicingRadiologistID")
        return LidcReading(
            reader_id=reader_id,
            nodules=tuple(self.nodule(n, reader_id) for n in _children(session, "unblindedReadNodule")),
            non_nodules=tuple(self.non_nodule(n) for n in _children(session, "nonNodule")),
        )

    def nodule(self, element: ET.Element, reader_id: str) -> LidcNodule:
        nodule_id = _text(element, "noduleID")
        where = f"nodule {nodule_id!r} of reader {reader_id!r}"
        characteristics: dict[str, int] = {}
        block = _child(element, "characteristics")
        if block is not None:
            for item in block:
                if item.text is not None and item.text.strip():
                    characteristics[_local(item.tag)] = self.number(block, _local(item.tag), int, where)
        rois = tuple(self.roi(roi, where) for roi in _children(element, "roi"))
        return LidcNodule(nodule_id, characteristics.get("malignancy"), characteristics, rois)

    def roi(self, element: ET.Element, where: str) -> LidcRoi:
        z = self.number(element, "imageZposition", float, where)
        inclusion = _text(element, "inclusion", "TRUE").upper() != "FALSE"
        points = [self.point(edge, where) for edge in _children(element, "edgeMap")]
        points_rc = np.array(points, dtype=np.int64).reshape(-1, 2)
        return LidcRoi(z, _text(element, "imageSOP_UID"), inclusion, points_rc)

    def point(self, element: ET.Element, where: str) -> tuple[int, int]:
        col = self.number(element, "xCoord", int, where)
        row = self.number(element, "yCoord", int, where)
        return row, col

    def non_nodule(self, element: ET.Element) -> LidcNonNodule:
        non_nodule_id = _text(element, "nonNoduleID")
        where = f"non-nodule {non_nodule_id!r}"
        z = self.number(element, "imageZposition", float, where)
        locus = _child(element, "locus")
        row, col = self.point(locus, where) if locus is not None else (-1, -1)
        return LidcNonNodule(non_nodule_id, z, _text(element, "imageSOP_UID"), (row, col))


# ------------------------------------------------------------------------ geometry


def _slice_position(geometry: Geometry, z_mm: float, row: float, col: float) -> float:
    """The continuous slice index at which pixel (row, col) lies at patient height ``z_mm``."""
    origin_z = geometry.irc_to_xyz([0.0, row, col])[2]
    step_z = geometry.irc_to_xyz([1.0, row, col])[2] - origin_z
    if abs(step_z) < 1e-6:
        raise LunaError(
            "the CT's slices are not stacked along z (sagittal or coronal series); "
            "LIDC outlines are placed by imageZposition and need an axial series"
        )
    return (z_mm - origin_z) / step_z


def nodule_center_xyz(nodule: LidcNodule, geometry: Geometry) -> np.ndarray:
    """The mean of the nodule's outline points in patient mm (also for ROIs outside the volume)."""
    points = []
    for roi in nodule.rois:
        if not roi.inclusion or len(roi.points_rc) == 0:
            continue
        row, col = roi.points_rc.mean(axis=0)
        index = _slice_position(geometry, roi.z_mm, row, col)
        points.append(geometry.irc_to_xyz([index, row, col]))
    if not points:
        return np.full(3, np.nan)
    return np.mean(points, axis=0)


def nodules_near(
    message: LidcReadMessage, geometry: Geometry, center_xyz: Sequence[float], max_distance_mm: float = 15.0
) -> list[tuple[LidcReading, LidcNodule]]:
    """The readers' nodules whose outline centre lies within ``max_distance_mm`` of ``center_xyz``.

    One entry per (reader, nodule), nearest first within each reader, readers in file
    order: the usual way to gather one physical nodule's outlines across readers.
    """
    center = np.asarray(center_xyz, dtype=np.float64)
    out = []
    for reading in message.readings:
        found = []
        for nodule in reading.nodules:
            distance = float(np.linalg.norm(nodule_center_xyz(nodule, geometry) - center))
            if distance < max_distance_mm:
                found.append((distance, nodule))
        out += [(reading, nodule) for _, nodule in sorted(found, key=lambda item: item[0])]
    return out


# ----------------------------------------------------------------------- rasterising


def roi_mask(nodule: LidcNodule, ct: Ct, *, include_outline: bool = True) -> np.ndarray:
    """One reader's outlines of ``nodule`` as a bool mask shaped like ``ct.hu``.

    ROIs are placed on the slice nearest their ``imageZposition`` (within half a
    slice spacing); those outside the volume are skipped.
    """
    shape = ct.hu.shape
    mask = np.zeros(shape, dtype=bool)
    holes: list[tuple[int, LidcRoi]] = []
    for roi in nodule.rois:
        if len(roi.points_rc) == 0:
            continue
        row, col = roi.points_rc.mean(axis=0)
        index = int(math.floor(_slice_position(ct.geometry, roi.z_mm, row, col) + 0.5))
        if not 0 <= index < shape[0]:
            continue
        if roi.inclusion:
            inside, outline = _polygon(roi.points_rc, shape[1:])
            mask[index] |= inside | outline if include_outline else inside & ~outline
        else:
            holes.append((index, roi))
    for index, roi in holes:
        inside, outline = _polygon(roi.points_rc, shape[1:])
        # The hole's outline pixels follow the same convention: nodule when outlines count as nodule.
        mask[index] &= ~(inside & ~outline if include_outline else inside | outline)
    return mask


def _polygon(points_rc: np.ndarray, shape_rc: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outline) masks of a closed polygon through pixel centres, clipped to ``shape_rc``.

    ``inside``: pixel centres inside by the even-odd rule (a point on an edge may go
    either way: callers combine with ``outline``). ``outline``: the pixels on the
    straight segments joining consecutive points, the last to the first.
    """
    rows_n, cols_n = shape_rc
    inside = np.zeros(shape_rc, dtype=bool)
    outline = np.zeros(shape_rc, dtype=bool)
    pts = np.asarray(points_rc, dtype=np.float64)
    nxt = np.roll(pts, -1, axis=0)

    # Outline: sample each segment at one point per pixel step.
    steps = np.maximum(np.abs(nxt - pts).max(axis=1).astype(np.int64), 1)
    t = np.concatenate([np.arange(s) / s for s in steps])
    seg = np.repeat(np.arange(len(pts)), steps)
    line = np.rint(pts[seg] + t[:, None] * (nxt[seg] - pts[seg])).astype(np.int64)
    keep = (line[:, 0] >= 0) & (line[:, 0] < rows_n) & (line[:, 1] >= 0) & (line[:, 1] < cols_n)
    outline[line[keep, 0], line[keep, 1]] = True

    # Inside: per row, where the horizontal line through the pixel centres crosses
    # the edges (half-open in row, so a vertex is counted once), and the pixels
    # with an odd number of crossings to their right.
    r0, c0 = np.floor(pts.min(axis=0)).astype(np.int64)
    r1, c1 = np.ceil(pts.max(axis=0)).astype(np.int64)
    ra, rb = max(r0, 0), min(r1 + 1, rows_n)
    ca, cb = max(c0, 0), min(c1 + 1, cols_n)
    if len(pts) < 3 or ra >= rb or ca >= cb:
        return inside, outline
    y0, x0, y1, x1 = pts[:, 0], pts[:, 1], nxt[:, 0], nxt[:, 1]
    cols = np.arange(ca, cb, dtype=np.float64)
    for row in range(ra, rb):
        crosses = ((y0 <= row) & (row < y1)) | ((y1 <= row) & (row < y0))
        if not crosses.any():
            continue
        xs = x0[crosses] + (row - y0[crosses]) * (x1[crosses] - x0[crosses]) / (y1[crosses] - y0[crosses])
        xs.sort()
        right = len(xs) - np.searchsorted(xs, cols, side="right")
        inside[row, ca:cb] = (right % 2) == 1
    return inside, outline


# ------------------------------------------------------------------------ agreement


def dice_per_slice(mask: np.ndarray, reference: np.ndarray) -> dict[int, float]:
    """Dice of ``mask`` against ``reference`` on every slice where ``reference`` has voxels."""
    out = {}
    for index in np.flatnonzero(reference.any(axis=(1, 2))):
        a, b = mask[index], reference[index]
        out[int(index)] = float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    return out


def compare_with_readers(
    mask: np.ndarray, reader_masks: Sequence[np.ndarray], *, majority: int = 2
) -> dict[str, dict[int, float]]:
    """Per-slice Dice of ``mask`` against each reader (``"reader 1"``, ...), ``"union"`` and ``"majority"``.

    The majority is the voxels at least ``majority`` readers included.
    """
    out = {f"reader {k + 1}": dice_per_slice(mask, m) for k, m in enumerate(reader_masks)}
    if reader_masks:
        votes = np.sum([m.astype(np.uint8) for m in reader_masks], axis=0)
        out["union"] = dice_per_slice(mask, votes >= 1)
        out["majority"] = dice_per_slice(mask, votes >= majority)
    return out
