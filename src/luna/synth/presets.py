"""Dataset presets: how many scans, how big, and how they are sampled.

A preset fixes the voxel grid (in-plane size, slice count range, spacings) and how
much goes into each scan (nodules, candidates). The patient is sized to the field of
view, so the small presets hold small patients rather than coarse voxels: nodules
keep their real diameters and stay several voxels wide.

``demo`` (the built-in training set) has what real chest CT has in-plane: 512x512
slices of 0.6-0.9 mm and adult patients; to stay quick to generate and to train on,
each scan is a slab of 48-64 slices through a whole patient's lungs (the vessel
trees still come from hila that may lie outside it). ``realistic`` is the same
without the slab: whole chests, for longer training.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    name: str
    scans: int
    inplane_size: int
    """Rows and columns of every slice."""
    inplane_spacing: tuple[float, float]
    """Range of the in-plane voxel size (mm); the field of view follows from it."""
    slice_spacings: tuple[float, ...]
    """Slice spacings (mm) to draw from, as scanners offer them."""
    slices: tuple[int, int]
    """Range of the number of slices."""
    nodules_mean: float
    """Mean number of annotated (>= 3 mm) nodules per scan."""
    max_diameter_mm: float
    candidates: tuple[int, int]
    """Range of the number of non-nodule candidates per scan."""
    scans_per_subset: int
    body_fill: tuple[float, float] = (0.76, 0.95)
    """Body width as a share of the field of view (arms above the head; real scans
    often fill it, and a wide patient is cut by the reconstruction circle)."""
    padding_share: float = 0.7
    """Share of scans with a circular field of view padded outside (-2000 / -3024)."""
    mixed_malignancy: bool = False
    """Every scan holds a malignant and a benign nodule, so that any split of a few
    scans can train and validate the malignancy classifier (the test preset)."""
    slab: bool = False
    """Scans are slabs of ``slices`` slices through the lungs of a whole-chest patient
    (otherwise the scan holds the whole chest and ``slices`` bounds its length)."""


REAL_INPLANE_SPACING = (0.6, 0.9)
"""In-plane voxel size (mm) of real chest CT at 512x512 (fields of view of 310-460 mm)."""
REAL_SLICE_SPACINGS = (0.7, 1.0, 1.25, 1.25, 1.5, 2.0, 2.5, 2.5, 2.5)
"""Slice spacings to draw from, about as in LUNA16: many 2.5 and 1.25 mm, some thin."""

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            scans=4,
            inplane_size=96,
            inplane_spacing=(1.5, 1.8),
            slice_spacings=(2.5,),
            slices=(40, 46),
            nodules_mean=2.5,
            max_diameter_mm=12.0,
            candidates=(30, 40),
            scans_per_subset=2,
            mixed_malignancy=True,
        ),
        Preset(
            name="demo",
            scans=20,
            inplane_size=512,
            inplane_spacing=REAL_INPLANE_SPACING,
            slice_spacings=REAL_SLICE_SPACINGS,
            slices=(48, 64),
            # Denser than LUNA16's 1.3 per whole scan: a slab is a third of the lungs,
            # and the classifier and the UNet need many nodules to learn from.
            nodules_mean=6.5,
            max_diameter_mm=30.0,
            candidates=(100, 160),
            scans_per_subset=4,
            slab=True,
        ),
        Preset(
            name="realistic",
            scans=60,
            inplane_size=512,
            inplane_spacing=REAL_INPLANE_SPACING,
            slice_spacings=REAL_SLICE_SPACINGS,
            slices=(100, 360),
            nodules_mean=2.0,
            max_diameter_mm=33.0,
            candidates=(350, 650),
            scans_per_subset=6,
        ),
        Preset(
            name="bench",
            scans=10,
            inplane_size=512,
            inplane_spacing=(0.58, 0.82),
            slice_spacings=(0.7, 1.0, 1.25, 1.25, 1.5, 2.0, 2.5, 2.5),
            slices=(100, 300),
            nodules_mean=2.2,
            max_diameter_mm=33.0,
            candidates=(350, 650),
            scans_per_subset=5,
        ),
    )
}
