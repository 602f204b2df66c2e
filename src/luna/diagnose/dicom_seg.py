"""A DICOM Segmentation (SEG) of the accepted nodules, for PACS viewers (OHIF, 3D Slicer's DICOM module).

Written with `highdicom` (an optional dependency: ``pip install "luna-nodule[dicom-seg]"``)
for a CT read from a DICOM folder: a BINARY segmentation with one segment per
accepted nodule, numbered and labelled as in the table ("nodule 1", ...; segmented
property: SCT Morphologically abnormal structure / Nodule; algorithm: luna, automatic,
artificial intelligence), its voxels from the label map (`luna.diagnose.volumes`).
It references the source series: highdicom copies the patient and study and lists
every source image, and each frame points at the CT slice it lies on.

Slices are matched by position, not by file order: each source file's
ImagePositionPatient is mapped through the CT's `Geometry` to a slice index, so the
frames line up with the volume luna read (which sorted the slices along their
normal) however the files are named. Only files of the CT's series count.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

import luna
from luna.errors import LunaError
from luna.fileio import write_atomic

__all__ = ["DICOM_SEG_NAME", "highdicom_available", "source_slices", "write_dicom_seg"]

log = logging.getLogger(__name__)

DICOM_SEG_NAME = "nodules.seg.dcm"
INSTALL_HINT = 'pip install "luna-nodule[dicom-seg]" (highdicom)'
_POSITION_TOLERANCE = 0.05  # of a voxel: a slice must sit on the CT's grid


def highdicom_available() -> bool:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


def source_slices(folder: Path, ct) -> list:
    """The pydicom headers (no pixel data) of ``ct``'s slices under ``folder``, in slice-index order."""
    import pydicom

    by_index: dict[int, object] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM (XML readings, notes): not a slice
            continue
        if str(getattr(ds, "SeriesInstanceUID", "")) != ct.series_uid or "ImagePositionPatient" not in ds:
            continue
        irc = ct.geometry.xyz_to_irc([float(v) for v in ds.ImagePositionPatient])
        k = int(round(irc[0]))
        if abs(irc[0] - k) > _POSITION_TOLERANCE or np.any(np.abs(irc[1:]) > _POSITION_TOLERANCE):
            continue  # not on the CT's grid (a localizer, a slice luna dropped)
        by_index.setdefault(k, ds)
    missing = sorted(set(range(ct.hu.shape[0])) - set(by_index))
    if missing:
        raise LunaError(f"{folder}: no DICOM file for slice(s) {missing[:5]} of series {ct.series_uid}; "
                        "cannot make a DICOM SEG that references every slice")
    return [by_index[k] for k in range(ct.hu.shape[0])]


def write_dicom_seg(path: Path, ct, labels: np.ndarray, nodules: Sequence[tuple[int, object]], folder: Path) -> Path:
    """Write the SEG of ``nodules`` ((number, nodule) pairs, numbered 1..k) from the label map ``labels``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not nodules:
        raise ValueError("a DICOM SEG needs at least one nodule")
    numbers = [number for number, _ in nodules]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"nodule numbers must be 1..k, got {numbers}")
    sources = source_slices(folder, ct)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="luna", version=luna.__version__, family=codes.cid7162.ArtificialIntelligence,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"nodule {number}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"luna nodule {number}",
        )
        for number, _ in nodules
    ]
    pixels = np.where(labels <= len(nodules), labels, 0).astype(np.uint16)
    if not pixels.any():
        raise ValueError("the label map holds no nodule voxel")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9001,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="luna",
        manufacturer_model_name="luna-nodule",
        software_versions=luna.__version__,
        device_serial_number="0",
        series_description="luna nodules",
        content_label="NODULES",
        content_description="Lung nodules found by luna (automatic; not a clinical device)",
    )
    import io

    buffer = io.BytesIO()
    seg.save_as(buffer)
    return write_atomic(Path(path), buffer.getvalue())
