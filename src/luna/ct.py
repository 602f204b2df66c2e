"""A CT scan in Hounsfield units with its geometry, and the chunks cut from it.

`Ct` is what every reader in `luna.io` returns: HU as int16 in ``[index, row, col]``
order with its `Geometry`. By default readers clip HU to ``DEFAULT_HU_RANGE`` =
[-1000, 1000]: below -1000 is air or scanner padding (-2000, -3024 outside the field
of view) and above 1000 is bone and metal, neither of which the models need, and the
book's checkpoints were trained on this range (`clip_hu`).

Chunks (the 3D crops the classifiers see) are cut by `crop`, which keeps the
candidate at the chunk's centre voxel ``shape // 2`` and pads with air (-1000 HU)
where the chunk leaves the volume, instead of shifting it (the book shifted).
`luna.io.read_chunk` cuts the same chunk straight from a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from luna.geometry import Geometry

__all__ = [
    "AIR_HU",
    "CHUNK_SHAPE",
    "DEFAULT_HU_RANGE",
    "GROUND_GLASS_EDGE_HU",
    "LUNG_HU",
    "SOLID_EDGE_HU",
    "Ct",
    "chunk_start",
    "clip_hu",
    "crop",
    "nodule_edge_hu",
]

AIR_HU = -1000
DEFAULT_HU_RANGE: tuple[int, int] | None = (-1000, 1000)
CHUNK_SHAPE: tuple[int, int, int] = (32, 48, 48)

SOLID_EDGE_HU = -400.0
"""Where a solid nodule ends: half-way between its tissue (0 .. +60 HU) and aerated lung."""
LUNG_HU = -850.0
"""Aerated lung parenchyma."""
GROUND_GLASS_EDGE_HU = -750.0
"""The lowest nodule edge (ground glass), above the lung and its noise."""


def nodule_edge_hu(density_hu: float, solid_edge_hu: float = SOLID_EDGE_HU, lung_hu: float = LUNG_HU,
                   lowest_hu: float = GROUND_GLASS_EDGE_HU) -> float:
    """The HU above which a voxel is tissue of a nodule of density ``density_hu``: half-way between that density
    and the lung, at most ``solid_edge_hu`` (solid nodules), at least ``lowest_hu`` (ground glass). On a blurred
    edge the half-way value is crossed where half the voxel is nodule. The ground-truth masks (`luna.masks`) and
    the diagnosis's diameter (`luna.inference.measure`) both draw the edge by it."""
    return float(np.clip(0.5 * (density_hu + lung_hu), lowest_hu, solid_edge_hu))


@dataclass(frozen=True, eq=False)
class Ct:
    """A CT volume: int16 HU indexed ``[index, row, col]``, and where it lies in patient space."""

    hu: np.ndarray
    geometry: Geometry
    series_uid: str
    source: str = ""
    """The file or folder it was read from (for messages)."""

    @property
    def name(self) -> str:
        """What a message calls it: the file or folder it was read from, else its series."""
        return self.source or f"series {self.series_uid}"

    @property
    def shape_irc(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def crop(self, center_xyz: Sequence[float], shape_irc: Sequence[int] = CHUNK_SHAPE) -> np.ndarray:
        """The chunk of ``shape_irc`` voxels centred on the voxel nearest ``center_xyz`` (end slices repeat: `crop`)."""
        return crop(self.hu, self.geometry.xyz_to_irc(center_xyz), shape_irc, repeat_slices=True)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this volume and geometry (for writing .mha / .nii.gz)."""
        image = sitk.GetImageFromArray(self.hu)
        self.geometry.apply_to_sitk(image)
        return image


def crop(
    volume: np.ndarray,
    center_irc: Sequence[float],
    shape_irc: Sequence[int] = CHUNK_SHAPE,
    *,
    fill: float = AIR_HU,
    repeat_slices: bool = False,
) -> np.ndarray:
    """Cut ``shape_irc`` voxels from ``volume`` with the voxel nearest ``center_irc`` at ``shape // 2``.

    Parts outside the volume are ``fill``; the chunk is never shifted to stay inside,
    so the candidate is always at the same place in the chunk. Always a new array.

    ``repeat_slices`` (3D volumes): beyond the first and last slice the end slices
    repeat instead, and only the in-plane outside is ``fill``. That is the rule of
    `Ct.crop` (CT chunks): a scan's ends are where its scanned range stops, not air,
    and a chunk of a short scan or slab (16 slices of 2.5 mm for a 32-slice chunk) is
    otherwise half a wall of air around the nodule, which no training chunk looks
    like; the segmentation's context slices repeat the ends the same way
    (`luna.inference.segment.context_slices`).
    """
    start, shape = chunk_start(center_irc, shape_irc)
    size = np.array(volume.shape[:3])
    overlaps = start[0] < size[0] and start[0] + shape[0] > 0  # a chunk wholly outside stays all fill
    if repeat_slices and overlaps and (start[0] < 0 or start[0] + shape[0] > size[0]):
        first = int(np.clip(start[0], 0, size[0] - 1))
        last = int(np.clip(start[0] + shape[0] - 1, 0, size[0] - 1))
        # the slices the chunk needs, cut in-plane once each, then repeated at the ends
        count = last - first + 1
        inner = crop(volume[first : last + 1], (count // 2, *center_irc[1:]), (count, *shape[1:]), fill=fill)
        picks = np.clip(np.arange(start[0], start[0] + shape[0]), first, last) - first
        return inner[picks]
    lo = np.clip(start, 0, size)
    hi = np.clip(start + shape, 0, size)
    if np.all(lo == start) and np.all(hi == start + shape):
        return volume[tuple(slice(a, b) for a, b in zip(lo, hi))].copy()
    out = np.full(tuple(shape) + volume.shape[3:], fill, dtype=volume.dtype)
    if np.all(hi > lo):
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        out[dst] = volume[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return out


def clip_hu(volume: np.ndarray, hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE) -> np.ndarray:
    """HU as int16, clipped to ``hu_range`` (``None``: only to the int16 range)."""
    low, high = hu_range if hu_range is not None else (-32768, 32767)
    if np.issubdtype(volume.dtype, np.floating):
        volume = np.rint(volume)
    if volume.dtype == np.int16:
        return np.clip(volume, low, high)  # always a new array, even for a read-only view
    return np.clip(volume, low, high).astype(np.int16)


def chunk_start(center_irc: Sequence[float], shape_irc: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The first voxel and the shape of a chunk centred on the voxel nearest ``center_irc``."""
    # floor(x + 0.5), not np.rint: rint rounds .5 to even, which would put the
    # centre of a chunk on different sides for neighbouring half-voxel positions.
    center = np.floor(np.asarray(center_irc, dtype=np.float64) + 0.5).astype(np.int64)
    shape = np.asarray(shape_irc, dtype=np.int64)
    return center - shape // 2, shape
