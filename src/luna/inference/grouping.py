"""Segmentation output -> candidate nodules ("grouping").

`group_detections` turns the UNet's probability volume into a list of `Detection`
records, one per connected blob, for the nodule classifier:

1. threshold: voxels with ``p > threshold``;
2. clean: a binary opening **in the axial plane only** (a disc of
   ``opening_radius`` voxels in (row, col), one slice thick). It removes structures
   narrower than ``2 * radius + 1`` voxels in-plane (vessel cross-sections, one- or
   two-voxel bridges), so two blobs joined by such a thin neck become two
   detections. Blobs that touch over a broad face stay one detection: an opening
   cannot split them. It is not 3D because slices are up to 2.5 mm thick: a 3D
   opening of radius 1 needs three slices (7.5 mm) of support and would erase the
   small nodules we are looking for. A blob the opening erases *entirely* is kept as
   it was (``keep_erased``): the UNet marks only the core of a 4-5 mm nodule above its
   operating threshold, a few voxels that no disc fits in. Measured on the quality
   bench (48 held-out scans, 87 nodules, run 2026-11-30_02.56.53's models, trained
   without such blobs): CPM 0.893 (0.838-0.944) -> 0.903 (0.849-0.951), nodules found
   at 8 FP/scan 80 -> 83, at the operating threshold 0.885 at 0.42 FP/scan -> 0.897 at
   0.73, for 162 -> 250 proposals per scan. Three 3.6-5.2 mm juxta-pleural and
   juxta-vascular nodules that had been erased (3-9 voxels above the threshold) are
   proposed now; the run trained with these proposals (2026-11-30_06.41.57) scores them
   0.90, 0.90 and 0.49, and reaches CPM 0.926 (0.876-0.971);
3. label connected components in 3D (26-neighbourhood by default, as
   `luna.segmentation.score_segmentation` counts them: a nodule drawn on thick
   slices may shift in-plane from one slice to the next and touch its neighbour only
   along an edge, and one candidate per nodule beats two half ones);
4. per component, all at once (one pass over the foreground voxels, no loop over
   components): voxel count, bounding box, mean / max probability and the
   HU-weighted centre of mass, with weights ``max(HU + 1000, 0)``: denser tissue
   pulls harder and air weighs nothing. A component made of air only falls back to
   its plain centroid;
5. volume = voxels x voxel volume, where the voxel volume is
   ``|det(D)| * prod(spacing)`` (1 x the spacing product for the orthonormal
   directions of LUNA16, smaller after gantry tilt), and the equivalent-sphere
   diameter ``(6 V / pi) ** (1/3)``;
6. keep diameters within ``[min_diameter_mm, max_diameter_mm]``. LUNA16 nodules are
   3-30 mm, but the blob of a small nodule is smaller than the nodule: the UNet
   marks its core above the threshold, and the opening trims the one-slice caps on
   thick slices. The lower default, 1.5 mm, is measured: on the quality bench (24
   held-out scans, 46 nodules, one run's UNet) blobs of 1.5-2.5 mm held 3 of the 7
   nodules (4.2-5.0 mm) that a 2.5 mm limit lost; proposal recall 0.848 -> 0.913 at
   82 -> 150 proposals per scan, and end to end with the residual classifier CPM
   0.761-0.773 -> 0.776-0.783. A candidate lost here cannot be recovered, whereas an
   extra one costs one classifier pass (a blob that survives the opening is at least
   2.8 mm on 2.5 mm slices, so only thin-slice scans get the extra ones). The upper
   default, 40 mm, leaves room for a 30 mm nodule plus the vessel stubs a
   segmentation tends to attach to it (2.4 x its volume), while dropping slabs of
   wall or heart;
7. centre irc -> xyz through the CT's `Geometry`.

Detections are sorted by max probability, descending (then mean probability,
then size): the maximum is the segmentation's most confident voxel, whereas the mean
is diluted by the boundary voxels near the threshold, more so for small nodules.
An empty mask (or a CT without lungs) gives ``[]``.

**Faint blobs** (`search_threshold`, `add_faint`): one threshold cannot serve every
nodule. At the operating threshold a ground-glass nodule leaves only pieces of its
rim, and a small nodule whose core peaks just below it leaves nothing; at a lower one
those appear, but nodules on the wall or a vessel merge with it and their centre
moves off. So the pipeline groups twice: at the operating threshold, and at the
*search threshold* (the same odds divided by ``SEARCH_ODDS_RATIO``: 0.999 -> 0.990),
and adds the search threshold's blobs whose centre is at least ``SAME_BLOB_MM`` from
every detection it has, the most probable first, at most a budget of them per scan
(`luna.inference.pipeline.SEARCH_BUDGET`). Measured on the quality bench (48 held-out
scans, 87 nodules, run 2026-12-01_01.40.34's UNet, float32 probabilities): at 0.999
alone 79 nodules proposed at 225 detections per scan; at 0.990 alone 81 at 581; both,
with 25 / 50 / 100 / 200 added blobs at most: 79 / 80 / 82 / 82 at 250 / 275 / 325 / 425
per scan. The three gained at 100: juxta-vascular 4.6 mm, juxta-pleural 6.7 mm, solid
4.4 mm touching a vessel. Still never proposed: four juxta-pleural nodules of 4.4-7.5
mm sunk 17-56% into the wall, where the UNet marks nothing above 0.99, and a faint
6.7 mm ground-glass one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from luna.ct import AIR_HU, Ct

__all__ = ["SAME_BLOB_MM", "SEARCH_ODDS_RATIO", "Detection", "add_faint", "group_detections", "search_threshold"]

SEARCH_ODDS_RATIO = 10.0
"""The search threshold's odds p / (1 - p) are the operating threshold's divided by this."""
SAME_BLOB_MM = 3.0
"""A search-threshold blob centred this close to a detection is that detection again."""


@dataclass(frozen=True)
class Detection:
    """One candidate nodule: a connected component of the thresholded segmentation."""

    center_xyz: tuple[float, float, float]
    """HU-weighted centre in patient mm (LPS)."""
    center_irc: tuple[float, float, float]
    """The same centre in continuous voxel coordinates (index, row, col)."""
    voxels: int
    volume_mm3: float
    diameter_mm: float
    """Diameter of the sphere with the component's volume."""
    mean_probability: float
    max_probability: float
    bbox_irc: tuple[int, int, int, int, int, int]
    """(i0, r0, c0, i1, r1, c1), end exclusive, inside the volume."""


def group_detections(
    probabilities: np.ndarray,
    ct: Ct,
    *,
    threshold: float = 0.5,
    opening_radius: int = 1,
    min_diameter_mm: float = 1.5,
    max_diameter_mm: float = 40.0,
    connectivity: int = 3,
    keep_erased: bool = True,
) -> list[Detection]:
    """Candidate nodules from a probability volume aligned with ``ct`` (see the module doc).

    ``opening_radius`` is in voxels, in-plane (0 disables the cleaning);
    ``connectivity`` is scipy's: 1 = 6, 2 = 18, 3 = 26 neighbours; ``keep_erased``:
    blobs the opening removes entirely stay, uncleaned (False: they are dropped).
    Raises ValueError for a shape mismatch, NaN probabilities or bad parameters.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.shape != ct.hu.shape:
        raise ValueError(
            f"probabilities have shape {probabilities.shape}, the CT {ct.hu.shape}: "
            "they must be aligned voxel for voxel"
        )
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if opening_radius < 0:
        raise ValueError(f"opening_radius must be >= 0, got {opening_radius}")
    if not 0 <= min_diameter_mm <= max_diameter_mm:
        raise ValueError(f"need 0 <= min_diameter_mm <= max_diameter_mm, got {min_diameter_mm}, {max_diameter_mm}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    slice_max = probabilities.max(axis=(1, 2)) if probabilities.size else np.zeros(probabilities.shape[0])
    if np.isnan(slice_max).any():  # the max of a slice holding a NaN is NaN
        raise ValueError("probabilities contain NaN (a diverged model or a broken input?)")

    # Everything works inside the foreground's bounding box (the lungs at most), found
    # without a volume-sized mask: the threshold, the opening's copies and the int32
    # labels then cost a fraction of the volume's memory instead of several times it.
    box = _bounding_box(probabilities, slice_max, threshold)
    if box is None:
        return []
    structure = ndimage.generate_binary_structure(3, connectivity)
    mask = probabilities[box] > threshold
    if opening_radius:
        opened = _open_in_plane(mask, opening_radius)
        mask = _with_erased_blobs(mask, opened, structure) if keep_erased else opened
        del opened
    labels, count = ndimage.label(mask, structure=structure)
    del mask
    if count == 0:
        return []

    # Work on the foreground voxels only: one pass over the box to find them,
    # then every per-component reduction is a bincount / reduceat over those.
    flat = np.flatnonzero(labels)
    ids = labels.reshape(-1)[flat]
    irc = tuple(coord + s.start for coord, s in zip(np.unravel_index(flat, labels.shape), box))
    del labels
    prob = probabilities[irc].astype(np.float64)
    weight = np.maximum(ct.hu[irc].astype(np.float64) - AIR_HU, 0.0)

    n = count + 1
    voxels = np.bincount(ids, minlength=n)[1:]
    weight_sum = np.bincount(ids, weight, minlength=n)[1:]
    has_weight = weight_sum > 0
    center = np.empty((count, 3))
    for axis, coord in enumerate(irc):
        weighted = np.bincount(ids, weight * coord, minlength=n)[1:]
        plain = np.bincount(ids, coord, minlength=n)[1:] / voxels
        center[:, axis] = np.where(has_weight, weighted / np.where(has_weight, weight_sum, 1.0), plain)
    mean_prob = np.bincount(ids, prob, minlength=n)[1:] / voxels

    # Max and bbox by sorting the foreground by label (ndimage.label numbers every
    # label 1..count, so each has a non-empty run) and reducing each run.
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate(([0], np.cumsum(voxels)[:-1]))
    max_prob = np.maximum.reduceat(prob[order], starts)
    lows = [np.minimum.reduceat(coord[order], starts) for coord in irc]
    highs = [np.maximum.reduceat(coord[order], starts) + 1 for coord in irc]

    geometry = ct.geometry
    voxel_mm3 = abs(float(np.linalg.det(geometry.direction_matrix))) * float(np.prod(geometry.spacing_xyz))
    volume = voxels * voxel_mm3
    diameter = np.cbrt(6.0 * volume / math.pi)
    keep = np.flatnonzero((diameter >= min_diameter_mm) & (diameter <= max_diameter_mm))
    center_xyz = geometry.irc_to_xyz(center[keep])

    detections = [
        Detection(
            center_xyz=tuple(float(v) for v in xyz),
            center_irc=tuple(float(v) for v in center[k]),
            voxels=int(voxels[k]),
            volume_mm3=float(volume[k]),
            diameter_mm=float(diameter[k]),
            mean_probability=float(mean_prob[k]),
            max_probability=float(max_prob[k]),
            bbox_irc=tuple(int(a[k]) for a in (*lows, *highs)),
        )
        for k, xyz in zip(keep, center_xyz)
    ]
    detections.sort(key=lambda d: (-d.max_probability, -d.mean_probability, -d.voxels, d.center_irc))
    return detections


def search_threshold(threshold: float) -> float:
    """The lower threshold faint blobs are grouped at: ``threshold``'s odds / ``SEARCH_ODDS_RATIO``."""
    if not 0.0 < threshold < 1.0:
        return threshold
    odds = threshold / (1.0 - threshold) / SEARCH_ODDS_RATIO
    return odds / (1.0 + odds)


def add_faint(detections: list[Detection], faint: list[Detection], budget: int,
              same_mm: float = SAME_BLOB_MM) -> list[Detection]:
    """``detections`` plus at most ``budget`` of ``faint`` (in their order: the most probable first)
    whose centre is at least ``same_mm`` from every one of ``detections`` (see the module docstring).
    Two faint blobs are never the same one: they are different components at one threshold.
    """
    if budget <= 0 or not faint:
        return list(detections)
    centers = np.array([d.center_xyz for d in detections], dtype=np.float64).reshape(-1, 1, 3)
    points = np.array([d.center_xyz for d in faint], dtype=np.float64)
    repeated = (np.sum((points - centers) ** 2, axis=2) < same_mm**2).any(axis=0)  # (detections, faint) -> faint
    return [*detections, *[d for d, again in zip(faint, repeated) if not again][:budget]]


def _bounding_box(
    probabilities: np.ndarray, slice_max: np.ndarray, threshold: float
) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every voxel with ``probability > threshold``; None when there is none.

    Slices from their maxima (``slice_max``), then rows and columns within them:
    reductions only, so no boolean volume is allocated (56 MiB for 218x512x512).
    """
    hit = np.flatnonzero(slice_max > threshold)
    if hit.size == 0:
        return None
    box = [slice(int(hit[0]), int(hit[-1]) + 1)]
    slab = probabilities[box[0]]
    for axis in (1, 2):
        hit = np.flatnonzero(slab.max(axis=(0, 3 - axis)) > threshold)
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _open_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening of every axial slice by a disc of ``radius`` voxels.

    Done with shifted logical and/or over the offsets of the disc rather than
    `ndimage.binary_opening`: a handful of whole-array boolean operations, several
    times faster on a 512x512x128 mask. The mask is padded with background, so
    outside the volume counts as background for the erosion (as in ndimage) and a
    blob cut by the border keeps its border voxels (the dilation puts them back).
    """
    offsets = [
        (dr, dc)
        for dr in range(-radius, radius + 1)
        for dc in range(-radius, radius + 1)
        if (dr or dc) and dr * dr + dc * dc <= radius * radius
    ]
    padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
    eroded = padded.copy()
    for dr, dc in offsets:
        eroded[_shifted(0, 0, padded.shape, radius)] &= padded[_shifted(dr, dc, padded.shape, radius)]
    opened = eroded.copy()
    for dr, dc in offsets:
        opened[_shifted(0, 0, padded.shape, radius)] |= eroded[_shifted(dr, dc, padded.shape, radius)]
    return opened[:, radius:-radius, radius:-radius]


def _with_erased_blobs(mask: np.ndarray, opened: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``opened`` plus every connected blob of ``mask`` of which the opening left no voxel.

    Such a blob cannot touch what the opening kept (the kept voxels are ``mask``'s too, so
    they would be one blob), so it is labelled on its own afterwards.
    """
    labels, count = ndimage.label(mask, structure=structure)
    erased = np.ones(count + 1, dtype=bool)
    erased[0] = False
    erased[labels[opened]] = False
    return opened | erased[labels]


def _shifted(dr: int, dc: int, shape: tuple[int, ...], radius: int) -> tuple[slice, slice, slice]:
    """The padded array's interior (the original volume) moved by (dr, dc) in-plane."""
    return (
        slice(None),
        slice(radius + dr, shape[1] - radius + dr),
        slice(radius + dc, shape[2] - radius + dc),
    )
