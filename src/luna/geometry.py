"""Patient coordinates (xyz, mm) <-> voxel coordinates (irc) for a CT volume.

Conventions (DESIGN.md):

- ``xyz`` is the patient coordinate system of DICOM and the LUNA16 CSVs (LPS, mm).
- ``irc`` is (index, row, col): the position in a volume array indexed
  ``[index, row, col]``, i.e. numpy's (z, y, x) order.
- The image-to-patient map is ITK's: ``xyz = origin + D @ diag(spacing) @ cri``,
  where ``cri = (col, row, index)`` is the voxel index in ITK's (i, j, k) order and
  the columns of the direction matrix ``D`` are the patient directions of the i, j
  and k axes. This is what SimpleITK's ``GetDirection`` returns (row-major).

Both conversions are vectorised over any leading shape and return floats: rounding
to a voxel is the caller's decision (`Geometry.xyz_to_irc_int`). The inverse map
uses the true matrix inverse, so the two are exact inverses for any invertible
direction matrix, oblique ones included (the book's version was not).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

__all__ = ["Geometry"]


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie in patient space.

    Fields are plain tuples so that a Geometry is hashable, comparable and cheap to
    pickle into DataLoader workers.
    """

    origin_xyz: tuple[float, float, float]
    spacing_xyz: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    """Row-major 3x3 direction matrix, as SimpleITK's ``GetDirection``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin_xyz", _floats(self.origin_xyz, 3, "origin_xyz"))
        object.__setattr__(self, "spacing_xyz", _floats(self.spacing_xyz, 3, "spacing_xyz"))
        object.__setattr__(self, "direction", _floats(self.direction, 9, "direction"))
        if min(self.spacing_xyz) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing_xyz}")
        if abs(np.linalg.det(self.direction_matrix)) < 1e-6:
            raise ValueError(f"direction matrix is singular: {self.direction}")
        # Finite, positive spacings can still make a map without a usable inverse
        # (1e-300 mm underflows to a singular matrix, 1e300 overflows).
        try:
            usable = np.isfinite(self._cri_to_xyz).all() and np.isfinite(self._xyz_to_cri).all()
        except np.linalg.LinAlgError:
            usable = False
        if not usable:
            raise ValueError(f"spacing {self.spacing_xyz} with this direction gives no invertible voxel-to-mm map")

    # -- derived matrices (computed once per instance) -----------------------------
    @cached_property
    def direction_matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=np.float64).reshape(3, 3)

    @cached_property
    def _cri_to_xyz(self) -> np.ndarray:
        return self.direction_matrix @ np.diag(self.spacing_xyz)

    @cached_property
    def _xyz_to_cri(self) -> np.ndarray:
        return np.linalg.inv(self._cri_to_xyz)

    @cached_property
    def metric_irc(self) -> np.ndarray:
        """(3, 3) squared mm per pair of voxel steps along (index, row, col): an irc offset ``o`` is
        ``sqrt(o @ metric_irc @ o)`` mm long, whatever the spacing and direction."""
        origin = self.irc_to_xyz(np.zeros(3))
        steps = self.irc_to_xyz(np.eye(3)) - origin  # row k: xyz of one step along irc axis k
        return steps @ steps.T

    @cached_property
    def voxels_per_mm_irc(self) -> np.ndarray:
        """How many voxels one mm reaches at most along each irc axis (a ball of r mm spans r times this)."""
        origin = np.asarray(self.origin_xyz)
        inverse = self.xyz_to_irc(np.eye(3) + origin) - self.xyz_to_irc(origin)  # row j: irc of 1 mm along xyz j
        return np.linalg.norm(inverse, axis=0)

    def squared_distances_mm(self, center_irc: Sequence[float], lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """Squared patient-mm distance to ``center_irc`` of every voxel centre of the box ``[lo, hi)`` (irc, end
        exclusive), shape ``hi - lo``; from separable offsets, ``o @ metric_irc @ o``, without an xyz per voxel."""
        offsets = [np.arange(a, b) - c for a, b, c in zip(lo, hi, center_irc)]
        o = np.ix_(*offsets)
        metric = self.metric_irc
        d2 = sum(metric[a, b] * o[a] * o[b] for a in range(3) for b in range(3))
        return np.broadcast_to(d2, tuple(int(b) - int(a) for a, b in zip(lo, hi)))

    @property
    def spacing_irc(self) -> tuple[float, float, float]:
        """Voxel size along (index, row, col) in mm."""
        return self.spacing_xyz[::-1]

    # -- conversions ---------------------------------------------------------------
    def irc_to_xyz(self, irc: Sequence[float] | np.ndarray) -> np.ndarray:
        """Voxel (index, row, col) -> patient xyz in mm; shape (..., 3) in and out."""
        cri = np.asarray(irc, dtype=np.float64)[..., ::-1]
        return cri @ self._cri_to_xyz.T + np.asarray(self.origin_xyz)

    def xyz_to_irc(self, xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """Patient xyz in mm -> continuous voxel (index, row, col); shape (..., 3)."""
        offset = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin_xyz)
        cri = offset @ self._xyz_to_cri.T
        return cri[..., ::-1]

    def xyz_to_irc_int(self, xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """Patient xyz -> the nearest voxel's integer (index, row, col)."""
        return np.rint(self.xyz_to_irc(xyz)).astype(np.int64)

    @property
    def slice_normal_xyz(self) -> np.ndarray:
        """Unit vector along the index (slice) axis in patient space."""
        k = self.direction_matrix[:, 2]
        return k / np.linalg.norm(k)

    # -- SimpleITK interop -----------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        """The geometry of a SimpleITK image (or an ImageFileReader after ReadImageInformation)."""
        return cls(image.GetOrigin(), image.GetSpacing(), image.GetDirection())

    def apply_to_sitk(self, image) -> None:
        """Give a SimpleITK image this geometry (for writing masks that line up with the CT)."""
        image.SetOrigin(self.origin_xyz)
        image.SetSpacing(self.spacing_xyz)
        image.SetDirection(self.direction)


def _floats(values, n: int, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())
    if len(out) != n or not all(np.isfinite(out)):
        raise ValueError(f"{name} needs {n} finite numbers, got {values!r}")
    return out
