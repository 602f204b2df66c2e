"""A CT scan in Hounsfield units with its geometry, and the readers that make one.

`load_ct(path)` reads any supported source into a `Ct`:

- MetaImage (``.mhd`` + ``.raw``, LUNA16's format; ``.mha``) and NIfTI
  (``.nii``, ``.nii.gz``) through SimpleITK, which also turns NIfTI's RAS into the
  LPS patient space of DICOM and LUNA16;
- a DICOM series folder through `luna.dicom`.

Every reader returns HU as int16 in ``[index, row, col]`` order. By default HU are
clipped to ``DEFAULT_HU_RANGE`` = [-1000, 1000]: below -1000 is air or scanner
padding (-2000, -3024 outside the field of view) and above 1000 is bone and metal,
neither of which the models need, and the book's checkpoints were trained on this
range. Pass ``hu_range=None`` to keep the scanner's values.

Chunks (the 3D crops the classifiers see) are cut by `crop`, which keeps the
candidate at the chunk's centre voxel ``shape // 2`` and pads with air (-1000 HU)
where the chunk leaves the volume, instead of shifting it (the book shifted).
`read_chunk` cuts the same chunk straight from a file, reading only the region it
needs when the format allows (uncompressed MetaImage, as in LUNA16), which makes a
cold chunk read cost milliseconds instead of a whole-scan load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from luna.errors import LunaError
from luna.geometry import Geometry

__all__ = [
    "AIR_HU",
    "CHUNK_SHAPE",
    "DEFAULT_HU_RANGE",
    "IMAGE_SUFFIXES",
    "Ct",
    "clip_hu",
    "crop",
    "load_ct",
    "read_chunk",
    "read_image",
    "series_uid_from_path",
]

AIR_HU = -1000
DEFAULT_HU_RANGE: tuple[int, int] | None = (-1000, 1000)
CHUNK_SHAPE: tuple[int, int, int] = (32, 48, 48)
IMAGE_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz")


@dataclass(frozen=True, eq=False)
class Ct:
    """A CT volume: int16 HU indexed ``[index, row, col]``, and where it lies in patient space."""

    hu: np.ndarray
    geometry: Geometry
    series_uid: str
    source: str = ""
    """The file or folder it was read from (for messages)."""

    @property
    def shape_irc(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def crop(self, center_xyz: Sequence[float], shape_irc: Sequence[int] = CHUNK_SHAPE) -> np.ndarray:
        """The chunk of ``shape_irc`` voxels centred on the voxel nearest ``center_xyz``."""
        return crop(self.hu, self.geometry.xyz_to_irc(center_xyz), shape_irc)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this volume and geometry (for writing .mha / .nii.gz)."""
        image = sitk.GetImageFromArray(self.hu)
        self.geometry.apply_to_sitk(image)
        return image


def load_ct(
    path: str | Path,
    *,
    series_uid: str | None = None,
    hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
    **dicom_options,
) -> Ct:
    """Read a CT from an image file or a DICOM series folder.

    ``series_uid`` picks the series in a DICOM folder that holds several; for an
    image file it overrides the uid taken from the file name. ``dicom_options`` go to
    `luna.dicom.read_dicom_series` (e.g. ``allow_gaps=True``).
    """
    path = Path(path)
    if path.is_dir():
        from luna.dicom import read_dicom_series

        return read_dicom_series(path, series_uid=series_uid, hu_range=hu_range, **dicom_options)
    if dicom_options:
        raise TypeError(f"DICOM options {sorted(dicom_options)} given for image file {path}")
    return read_image(path, series_uid=series_uid, hu_range=hu_range)


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
        series_uid=series_uid or series_uid_from_path(path),
        source=str(path),
    )


def read_chunk(
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
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _check_exists(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise LunaError(f"{path}: cannot read the image header ({_first_line(err)})") from None
    geometry = Geometry.from_sitk(reader)
    size_irc = np.array(reader.GetSize()[::-1])
    center_irc = geometry.xyz_to_irc(center_xyz)
    start, shape = _chunk_start(center_irc, shape_irc)
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


def crop(
    volume: np.ndarray,
    center_irc: Sequence[float],
    shape_irc: Sequence[int] = CHUNK_SHAPE,
    *,
    fill: float = AIR_HU,
) -> np.ndarray:
    """Cut ``shape_irc`` voxels from ``volume`` with the voxel nearest ``center_irc`` at ``shape // 2``.

    Parts outside the volume are ``fill``; the chunk is never shifted to stay inside,
    so the candidate is always at the same place in the chunk. Always a new array.
    """
    start, shape = _chunk_start(center_irc, shape_irc)
    size = np.array(volume.shape[:3])
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


def series_uid_from_path(path: str | Path) -> str:
    """LUNA16 names each scan ``<series uid>.mhd``; for other files the stem stands in."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _chunk_start(center_irc: Sequence[float], shape_irc: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    # floor(x + 0.5), not np.rint: rint rounds .5 to even, which would put the
    # centre of a chunk on different sides for neighbouring half-voxel positions.
    center = np.floor(np.asarray(center_irc, dtype=np.float64) + 0.5).astype(np.int64)
    shape = np.asarray(shape_irc, dtype=np.int64)
    return center - shape // 2, shape


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


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # ITK errors start with a file/line banner; the description is near the end.
    return lines[-1] if lines else type(err).__name__
