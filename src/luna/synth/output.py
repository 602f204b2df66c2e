"""Writing a synthetic dataset in the LUNA16 layout: MetaImage scans, the CSVs, DICOM series.

Every file is written under a temporary name in its final directory and moved into
place with `os.replace`, so a reader never sees half a file. A MetaImage pair is
written by SimpleITK into a temporary folder beside its final place (the ``.mhd``
names its ``.raw``, so the pair keeps its final names), and the ``.raw`` is moved
before the ``.mhd``: a ``.mhd`` that exists always has its data.

Number formats copy the real files: ``annotations.csv`` has 10 significant digits,
``annotations_with_malignancy.csv`` Python float reprs with ``True``/``False`` and
quoted ``"[4, 2, 4, 2]"``, ``candidates.csv`` two decimals.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from luna.fileio import write_atomic
from luna.geometry import Geometry

__all__ = [
    "UID_ROOT",
    "make_uid",
    "atomic_write_text",
    "write_csv",
    "write_metaimage",
    "write_dicom_series",
    "fmt10",
    "fmt_repr",
    "fmt_candidate",
]

# The root of the LIDC-IDRI / LUNA16 series uids. Ours have 28 digits after it where
# the real ones have 30, so a synthetic uid can never equal a real one.
UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


def make_uid(*parts: object, digits: int = 28, root: str = UID_ROOT) -> str:
    """A DICOM-valid uid (digits and dots, no leading zero, <= 64 characters) derived from ``parts``."""
    text = ":".join(str(p) for p in ("luna.synth", *parts))
    number = int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")
    tail = str(number)[:digits]
    if tail[0] == "0":
        tail = "1" + tail[1:]
    uid = root + tail
    assert len(uid) <= 64
    return uid


def atomic_write_text(path: Path, text: str) -> int:
    data = text.encode("utf-8")
    write_atomic(path, data)
    return len(data)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    """Write a CSV as the real LUNA16 files are: LF line ends, minimal quoting."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def fmt10(value: float) -> str:
    """10 significant digits, as in annotations.csv (``-128.6994211``)."""
    return f"{float(value):.10g}"


def fmt_repr(value: float) -> str:
    """Python's float repr, as pandas wrote annotations_with_malignancy.csv."""
    return repr(float(value))


def fmt_candidate(value: float) -> str:
    """Two decimals at most, as in candidates.csv (``-56.08``)."""
    return repr(round(float(value), 2))


def write_metaimage(path: Path, volume: np.ndarray, geometry: Geometry) -> int:
    """Write ``<uid>.mhd`` + ``<uid>.raw`` (int16, uncompressed) atomically; returns bytes written."""
    import SimpleITK as sitk

    path = Path(path)
    raw = path.with_suffix(".raw")
    tmp_dir = path.parent / f".tmp-{path.stem}-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.int16))
        geometry.apply_to_sitk(image)
        sitk.WriteImage(image, str(tmp_dir / path.name), useCompression=False)
        os.replace(tmp_dir / raw.name, raw)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path.stat().st_size + raw.stat().st_size


def write_dicom_series(folder: Path, volume: np.ndarray, geometry: Geometry, series_uid: str, *, seed_text: str,
                       patient_id: str, slice_thickness: float, padding_hu: int | None = None) -> int:
    """One CT Image Storage file per slice (explicit VR little endian, int16, intercept -1024).

    The series is written into a temporary folder that replaces ``folder`` at the end.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian
    from pydicom.valuerep import DSfloat

    def ds(v: float) -> DSfloat:
        return DSfloat(float(v), auto_format=True)

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    study_uid = make_uid(seed_text, "study")
    frame_uid = make_uid(seed_text, "frame")
    d = geometry.direction_matrix
    orientation = [ds(v) for v in (*d[:, 0], *d[:, 1])]
    nz, ny, nx = volume.shape
    stored = (volume.astype(np.int32) + 1024)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("HU out of the int16 range after rescaling")
    stored = stored.astype("<i2")
    total = 0
    for k in range(nz):
        sop_uid = make_uid(seed_text, "sop", k, digits=22) + f".{k + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        s = Dataset()
        s.file_meta = meta
        s.SOPClassUID = CTImageStorage
        s.SOPInstanceUID = sop_uid
        s.StudyInstanceUID = study_uid
        s.SeriesInstanceUID = series_uid
        s.FrameOfReferenceUID = frame_uid
        s.Modality = "CT"
        s.Manufacturer = "luna.synth"
        s.PatientID = patient_id
        s.PatientName = "Synthetic^Phantom"
        s.StudyDate = "20000101"
        s.SeriesDescription = "luna.synth phantom"
        s.SeriesNumber = 1
        s.InstanceNumber = k + 1
        s.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        position = geometry.irc_to_xyz((k, 0, 0))
        s.ImagePositionPatient = [ds(v) for v in position]
        s.ImageOrientationPatient = orientation
        s.PixelSpacing = [ds(geometry.spacing_xyz[1]), ds(geometry.spacing_xyz[0])]
        s.SliceThickness = ds(slice_thickness)
        s.SliceLocation = ds(position[2])
        s.Rows, s.Columns = ny, nx
        s.SamplesPerPixel = 1
        s.PhotometricInterpretation = "MONOCHROME2"
        s.BitsAllocated = 16
        s.BitsStored = 16
        s.HighBit = 15
        s.PixelRepresentation = 1
        s.RescaleIntercept = ds(-1024)
        s.RescaleSlope = ds(1)
        s.RescaleType = "HU"
        if padding_hu is not None and padding_hu <= -2000:
            s.PixelPaddingValue = int(padding_hu) + 1024
        s.KVP = ds(120)
        s.PixelData = stored[k].tobytes()
        name = tmp / f"{k + 1:06d}.dcm"
        s.save_as(name, enforce_file_format=True)
        total += name.stat().st_size
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return total
