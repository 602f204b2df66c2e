"""Volumes a viewer overlays on the CT: the mask, the probability map and the nodule label map.

All are written with the CT's geometry (`luna.io.image.save_volume_image`), so 3D
Slicer, ITK-SNAP or any NIfTI viewer lays them over the scan:

- ``segmentation.nii.gz``: uint8, 1 where the segmentation's p(nodule) is above
  ``--segmentation-threshold`` (the grouping's rule: ``p > threshold``);
- ``probabilities.nii.gz`` (``--save-probabilities``): the p(nodule) of every voxel,
  float32;
- ``labels.nii.gz``: uint16, the number of each accepted nodule (as in the table,
  `luna.diagnose.report.numbered`) on its voxels, 0 elsewhere.

The label map (`nodule_labels`): a nodule's voxels are those of the mask's
26-connected component under its centre (else, when the centre voxel is not in the
mask, the component with the most voxels within its radius) that lie within one
diameter of its centre. The distance bound cuts off the vessels a component can
drag along (grouping opens the mask in-plane to separate them; the mask written
here is not opened); a voxel claimed by two nodules goes to the nearer centre. A
nodule the mask does not reach (a faint blob, proposed at the search threshold:
`luna.inference.grouping.add_faint`) takes its voxels the same way from the mask at
the search threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from luna.inference.grouping import search_threshold

__all__ = ["mask_of", "nodule_labels", "write_volumes"]


def mask_of(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """The segmentation mask at ``threshold``: ``p > threshold`` in the volume's own dtype (float32 from
    `segment_ct`), the very comparison `group_detections` makes, so the mask holds what was grouped."""
    return probabilities > threshold


def nodule_labels(mask: np.ndarray, ct, nodules: Sequence[tuple[int, object]]) -> np.ndarray:
    """uint16 label map: each (number, nodule) pair's voxels (module docstring) set to its number."""
    labels = np.zeros(mask.shape, dtype=np.uint16)
    if not nodules or not mask.any():
        return labels
    components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    spacing = np.asarray(ct.geometry.spacing_irc, dtype=np.float64)
    best_distance = np.full(mask.shape, np.inf, dtype=np.float32)
    for number, nodule in nodules:
        center = np.asarray(nodule.center_irc, dtype=np.float64)
        reach = np.ceil(max(nodule.diameter_mm, 1.0) / spacing).astype(int)
        lo = np.maximum(np.floor(center).astype(int) - reach, 0)
        hi = np.minimum(np.ceil(center).astype(int) + reach + 1, mask.shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.ogrid[box]
        distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, spacing))).astype(np.float32)
        local = components[box]
        inside = np.clip(np.floor(center + 0.5).astype(int) - lo, 0, np.array(local.shape) - 1)
        component = local[tuple(inside)]
        if component == 0:  # centre off the mask (a ring, a crescent): the component most present near it
            near = local[(distance <= nodule.diameter_mm / 2) & (local > 0)]
            if near.size == 0:
                continue
            component = np.bincount(near).argmax()
        mine = (local == component) & (distance <= max(nodule.diameter_mm, 1.0))
        closer = mine & (distance < best_distance[box])
        labels[box][closer] = number
        best_distance[box][closer] = distance[closer]
    return labels


def write_volumes(out: Path, ct, probabilities: np.ndarray, nodules: Sequence[tuple[int, object]], *,
                  threshold: float, save_probabilities: bool = False) -> tuple[dict[str, str], np.ndarray]:
    """Write the mask, the label map and optionally the probabilities into ``out``.

    Returns the files written (kind -> name) and the label map (for the DICOM SEG).
    """
    from luna.io.image import save_volume_image  # SimpleITK's writer, only when writing

    files: dict[str, str] = {}
    mask = mask_of(probabilities, threshold)
    save_volume_image(mask, ct, out / "segmentation.nii.gz")
    files["segmentation"] = "segmentation.nii.gz"
    labels = nodule_labels(mask, ct, nodules)
    # which numbers got voxels: one linear count (np.unique would sort the whole volume)
    found = np.bincount(labels.reshape(-1), minlength=max((n for n, _ in nodules), default=0) + 1) > 0
    faint = [(number, nodule) for number, nodule in nodules if not found[number]]
    if faint:
        more = nodule_labels(mask_of(probabilities, search_threshold(threshold)), ct, faint)
        labels = np.where(labels > 0, labels, more)
    save_volume_image(labels, ct, out / "labels.nii.gz")
    files["labels"] = "labels.nii.gz"
    if save_probabilities:
        save_volume_image(probabilities, ct, out / "probabilities.nii.gz")
        files["probabilities"] = "probabilities.nii.gz"
    return files, labels
