"""MetaImage (.mhd + .raw, .mha) and NIfTI (.nii, .nii.gz) files through SimpleITK.

`read_image` reads a whole file into a `Ct`; SimpleITK turns NIfTI's RAS into the
LPS patient space of DICOM and LUNA16. `read_image_region` reads only the voxels of
one chunk: ITK streams the region from uncompressed MetaImage files (LUNA16's
format), which makes a cold chunk read cost milliseconds instead of a whole-scan
load. `metaimage_files` names the files a scan is made of (a ``.mhd`` header and the
data file it points to), for the cache's source identity. `save_volume_image`
writes a CT-shaped volume with the CT's geometry.

These functions are registered as formats in `luna.io.formats`; call them through
`luna.io.load_ct` / `luna.io.read_chunk`, which pick the reader by file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
from luna.io.formats import CtFormat, register_format

__all__ = ["METAIMAGE_SUFFIXES", "NIFTI_SUFFIXES", "metaimage_files", "read_image", "read_image_header",
           "read_image_region", "save_volume_image"]

METAIMAGE_SUFFIXES = (".mhd", ".mha")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_image(
    path: str | Path,
    *,
    series_uid: str | None = None,
    hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
) -> Ct:
    """Read a MetaImage or NIfTI file (anything SimpleITK reads as a 3D scalar image)."""
    path = Path(path)
    image = _read_sitk(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LunaError(
            f"{path}: expected a 3D greyscale CT, got a {image.GetDimension()}D image with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    # A view of SimpleITK's buffer, not a copy: clip_hu makes the one copy we keep,
    # so loading peaks at twice the volume instead of three times.
    hu = clip_hu(sitk.GetArrayViewFromImage(image), hu_range)
    return Ct(
        hu=hu,
        geometry=Geometry.from_sitk(image),
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
    geometry = Geometry.from_sitk(reader)
    size_irc = np.array(reader.GetSize()[::-1])
    center_irc = geometry.xyz_to_irc(center_xyz)
    start, shape = chunk_start(center_irc, shape_irc)
    lo = np.clip(start, 0, size_irc)
    hi = np.clip(start + shape, 0, size_irc)
    if np.any(hi <= lo):
        return np.full(tuple(shape), AIR_HU, dtype=np.int16)
    reader.SetExtractIndex([int(v) for v in lo[::-1]])
    reader.SetExtractSize([int(v) for v in (hi - lo)[::-1]])
    try:
        region = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as err:
        raise LunaError(f"{path}: cannot read voxel data ({_first_line(err)}); the file may be truncated") from None
    # Cut the region like the whole volume, with the centre moved into the region's
    # frame: the same padding and centring as `crop` on a loaded scan.
    return crop(clip_hu(region, hu_range), center_irc - lo, shape)


def read_image_header(path: str | Path) -> tuple[tuple[int, int, int], Geometry]:
    """(shape irc, geometry) of an image file from its header alone, without reading voxels."""
    reader = _header_reader(Path(path))
    return tuple(int(v) for v in reader.GetSize()[::-1]), Geometry.from_sitk(reader)


def _header_reader(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _check_exists(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise LunaError(f"{path}: cannot read the image header ({_first_line(err)})") from None
    return reader


def _read_sitk(path: Path) -> sitk.Image:
    _check_exists(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise LunaError(
            f"{path}: SimpleITK cannot read this image ({_first_line(err)}). "
            "Check that the file (and its .raw beside a .mhd) is complete and not truncated."
        ) from None


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise LunaError(f"{path}: no such file")
    if path.suffix.lower() == ".mhd":
        raw = _metaimage_data_file(path)
        if raw is not None and not raw.exists():
            raise LunaError(f"{path}: its voxel data file {raw} is missing; copy it beside the .mhd")


def _metaimage_data_file(path: Path) -> Path | None:
    """The ElementDataFile a .mhd header points to, or None when the data is inline/a list."""
    try:
        with open(path, "r", errors="replace") as header:
            for line in header:
                key, _, value = line.partition("=")
                if key.strip() == "ElementDataFile":
                    value = value.strip()
                    if value in ("LOCAL", "LIST") or "%" in value:
                        return None
                    return path.parent / value
    except OSError as err:
        raise LunaError(f"{path}: cannot read ({err.strerror})") from None
    return None


def metaimage_files(path: str | Path) -> list[Path]:
    """The files a MetaImage scan is made of: the header and, for ``.mhd``, its data file."""
    path = Path(path)
    files = [path]
    if path.suffix.lower() == ".mhd":
        data = _metaimage_data_file(path)
        if data is not None and data.exists():
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
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # ITK errors start with a file/line banner; the description is near the end.
    return lines[-1] if lines else type(err).__name__


register_format(CtFormat("MetaImage", read_image, suffixes=METAIMAGE_SUFFIXES, read_region=read_image_region,
                         files=metaimage_files))
register_format(CtFormat("NIfTI", read_image, suffixes=NIFTI_SUFFIXES))
