"""Tests for luna.dicom: real LIDC-IDRI slabs against SimpleITK, and synthetic series
written with pydicom for every rule (sorting, padding, rescale, gaps, tilt, codecs)."""

from __future__ import annotations

import logging
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

from luna.errors import LunaError
from luna.io import load_ct
from luna.io.dicom import DicomSeriesInfo, list_dicom_series, read_dicom_series

# -- real data -------------------------------------------------------------------------------

LIDC = SHARED_DATA / "lidc-idri"
UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
UID_0002 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"
NODULE_XYZ = (56.208, 86.343, -115.868)


def lidc_folder(patient: str) -> Path:
    folders = sorted(LIDC.glob(f"{patient}/*/*/"))
    if not folders:
        pytest.skip(f"real DICOM data not found under {LIDC}")
    return folders[0]


def sitk_series(folder: Path, uid: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return reader.Execute()


@pytest.mark.parametrize("patient, uid", [("LIDC-IDRI-0001", UID_0001), ("LIDC-IDRI-0002", UID_0002)])
def test_real_series_matches_simpleitk(patient, uid):
    folder = lidc_folder(patient)
    ct = read_dicom_series(folder, hu_range=None)
    image = sitk_series(folder, uid)
    reference = sitk.GetArrayFromImage(image)

    assert ct.series_uid == uid and ct.source == str(folder)
    assert ct.hu.dtype == np.int16 and ct.hu.shape == reference.shape
    np.testing.assert_allclose(ct.geometry.origin_xyz, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ct.geometry.spacing_xyz, image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ct.geometry.direction, image.GetDirection(), atol=1e-4)
    # SimpleITK keeps the outside-the-field-of-view padding (-2048 HU in 0001, -3024 in
    # 0002); we make it air. Everything else is the same voxel for voxel.
    padding = reference <= -2000
    assert padding.any()
    np.testing.assert_array_equal(ct.hu[~padding], reference[~padding])
    assert np.all(ct.hu[padding] == -1000)


def test_real_nodule_is_where_luna16_says():
    ct = read_dicom_series(lidc_folder("LIDC-IDRI-0001"))
    assert ct.hu.shape == (16, 512, 512)
    assert ct.hu.min() >= -1000 and ct.hu.max() <= 1000
    irc = ct.geometry.xyz_to_irc(NODULE_XYZ)
    assert np.all(irc > 0) and np.all(irc < np.array(ct.hu.shape) - 1)
    assert ct.hu[tuple(ct.geometry.xyz_to_irc_int(NODULE_XYZ))] > -100

    chunk = ct.crop(NODULE_XYZ, (8, 48, 48))
    index, row, col = np.meshgrid(*(np.arange(n) - n // 2 for n in chunk.shape), indexing="ij")
    _, row_mm, col_mm = ct.geometry.spacing_irc
    in_plane_mm = np.hypot(row * row_mm, col * col_mm)
    near = np.abs(index) <= 1
    # Measured: 100% of the core is > -300 HU; 76% of the ring is < -600 HU (median -774).
    core = chunk[near & (in_plane_mm <= 8)]
    ring = chunk[near & (in_plane_mm > 14) & (in_plane_mm <= 17)]
    assert (core > -300).mean() > 0.9
    assert (ring < -600).mean() > 0.6


def test_real_series_shuffled_together(tmp_path):
    sources = {UID_0001: lidc_folder("LIDC-IDRI-0001"), UID_0002: lidc_folder("LIDC-IDRI-0002")}
    files = [f for folder in sources.values() for f in folder.iterdir()]
    random.Random(1).shuffle(files)
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    for n, source in enumerate(files):  # annotations.xml comes along, under a random name too
        (mixed / ("sub" if n % 3 == 0 else "") / uuid.uuid4().hex).write_bytes(source.read_bytes())

    for uid, folder in sources.items():
        alone, together = read_dicom_series(folder), read_dicom_series(mixed, uid)
        assert together.geometry == alone.geometry
        np.testing.assert_array_equal(together.hu, alone.hu)
        assert together.series_uid == uid

    with pytest.raises(LunaError) as err:
        read_dicom_series(mixed)
    message = str(err.value)
    assert f"{UID_0001} (16 slices" in message and f"{UID_0002} (12 slices" in message
    assert "--dicom-series" in message and "\n" not in message

    with pytest.raises(LunaError, match="no series '1.2.3' in this folder.*16 slices.*12 slices.*Pass one of"):
        read_dicom_series(mixed, "1.2.3")
    infos = list_dicom_series(mixed)
    assert [(i.series_uid, i.slice_count, i.modality) for i in infos] == [(UID_0001, 16, "CT"), (UID_0002, 12, "CT")]
    assert all(i.folder == mixed for i in infos)


def test_load_ct_reads_a_dicom_folder():
    ct = load_ct(lidc_folder("LIDC-IDRI-0002"))
    assert ct.series_uid == UID_0002 and ct.hu.shape == (12, 512, 512)
    assert ct.hu.min() == -1000


# -- synthetic series --------------------------------------------------------------------------

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SHAPE = (16, 16)  # rows, columns
PIXEL_SPACING = (0.8, 0.7)  # DICOM order: row spacing, column spacing
PATTERN = np.arange(SHAPE[0] * SHAPE[1], dtype=np.int16).reshape(SHAPE)  # 0..255, no symmetry
SERIES = "1.2.826.0.1.3680043.8.498.1"


def oblique_orientation() -> tuple[float, ...]:
    a, b = np.radians(30), np.radians(20)
    row = (np.cos(a), np.sin(a), 0.0)
    column = (-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b))
    return (*row, *column)


def write_slice(
    path: Path,
    position,
    stored: np.ndarray | None = None,
    *,
    orientation=AXIAL,
    pixel_spacing=PIXEL_SPACING,
    series_uid: str = SERIES,
    slope: float = 1,
    intercept: float = -1024,
    instance: int = 1,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    transfer_syntax=ExplicitVRLittleEndian,
    sop_uid: str | None = None,
    **extra,
) -> Path:
    """One 16-bit signed CT slice; ``extra`` sets further DICOM keywords."""
    stored = (PATTERN + 1024) if stored is None else stored
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.SeriesDescription = "synthetic"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    if transfer_syntax.is_compressed:
        ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def stack_positions(n, *, spacing=2.5, origin=(-10.0, -20.0, -30.0), orientation=AXIAL, shift=(0.0, 0.0, 0.0)):
    """Positions of n slices along the normal, each moved by ``shift`` more than the last."""
    normal = np.cross(orientation[:3], orientation[3:])
    k = np.arange(n)[:, None]
    return np.asarray(origin) + k * spacing * normal + k * np.asarray(shift)


def write_series(folder: Path, positions, *, stored=None, **options) -> list[Path]:
    """Slices at ``positions`` under random names, InstanceNumber reversed; slice k holds PATTERN + 10k HU."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, position in enumerate(positions):
        pixels = PATTERN + 1024 + 10 * k if stored is None else stored[k]
        path = folder / f"{uuid.uuid4().hex}.dcm"
        paths.append(write_slice(path, position, pixels, instance=len(positions) - k, **options))
    return paths


def expected_hu(n: int) -> np.ndarray:
    return np.stack([PATTERN + 10 * k for k in range(n)]).astype(np.int16)


def test_a_series_too_large_for_the_free_memory_is_refused_before_its_pixels_are_read(tmp_path, monkeypatch):
    from luna.io import formats

    write_series(tmp_path, stack_positions(6))
    monkeypatch.setattr(formats, "available_memory_bytes", lambda: 100)
    with pytest.raises(LunaError, match=rf"{tmp_path}: 6 slices of .* GiB of memory is free here"):
        read_dicom_series(tmp_path)


def test_sorted_by_position_not_name_or_instance(tmp_path):
    positions = stack_positions(6)
    write_series(tmp_path, positions)
    ct = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(ct.hu, expected_hu(6))
    assert ct.geometry.origin_xyz == tuple(positions[0])
    assert ct.geometry.spacing_xyz == (0.7, 0.8, 2.5)  # (column, row, slice)
    assert ct.series_uid == SERIES


def test_oblique_geometry_matches_simpleitk(tmp_path):
    orientation = oblique_orientation()
    positions = stack_positions(5, spacing=1.25, orientation=orientation, origin=(12.5, -40.25, 101.0))
    write_series(tmp_path, positions, orientation=orientation)
    ct = read_dicom_series(tmp_path, hu_range=None)
    image = sitk_series(tmp_path, SERIES)
    np.testing.assert_allclose(ct.geometry.origin_xyz, image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(ct.geometry.spacing_xyz, image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ct.geometry.direction, image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(ct.hu, sitk.GetArrayFromImage(image))
    for k, position in enumerate(positions):
        np.testing.assert_allclose(ct.geometry.irc_to_xyz((k, 0, 0)), position, atol=1e-6)


def test_missing_slice(tmp_path, caplog):
    positions = np.delete(stack_positions(6), 3, axis=0)
    write_series(tmp_path, positions)
    with pytest.raises(LunaError, match=r"missing slices: 5 mm between .*\(-10.00, -20.00, -25.00\).*--allow-gaps \(allow_gaps=True"):
        read_dicom_series(tmp_path)
    with caplog.at_level(logging.WARNING, logger="luna.dicom"):
        ct = read_dicom_series(tmp_path, allow_gaps=True)
    assert ct.hu.shape[0] == 5 and ct.geometry.spacing_xyz[2] == 2.5
    assert "missing slices" in caplog.text


def test_non_uniform_spacing(tmp_path, caplog):
    along = np.array([0.0, 2.5, 5.0, 8.0, 10.5, 13.0, 15.5])  # one gap of 3 mm: not a missing slice
    positions = np.array([(-10.0, -20.0, z) for z in along])
    write_series(tmp_path, positions)
    with pytest.raises(LunaError, match="non-uniform slice spacing.*from 2.5 to 3 mm.*--allow-nonuniform \\(allow_nonuniform=True"):
        read_dicom_series(tmp_path)
    with pytest.raises(LunaError, match="non-uniform"):
        read_dicom_series(tmp_path, allow_gaps=True)
    with caplog.at_level(logging.WARNING, logger="luna.dicom"):
        ct = read_dicom_series(tmp_path, allow_nonuniform=True)
    assert ct.geometry.spacing_xyz[2] == 2.5 and ct.hu.shape[0] == 7
    assert "non-uniform" in caplog.text


def test_small_position_noise_is_accepted(tmp_path):
    positions = stack_positions(8) + np.random.default_rng(0).uniform(-1e-3, 1e-3, (8, 3))
    write_series(tmp_path, positions)
    assert read_dicom_series(tmp_path).hu.shape[0] == 8


def test_duplicate_slices(tmp_path, caplog):
    paths = write_series(tmp_path, stack_positions(4))
    shutil.copy(paths[1], tmp_path / "copy-of-slice.dcm")  # the same file twice
    with caplog.at_level(logging.WARNING, logger="luna.dicom"):
        ct = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(ct.hu, expected_hu(4))
    assert "duplicate" in caplog.text

    # Another image at the same position: the series mixes acquisitions.
    other = write_slice(tmp_path / "other.dcm", stack_positions(4)[2], PATTERN + 2000)
    with pytest.raises(LunaError, match="different images at the same position") as err:
        read_dicom_series(tmp_path)
    assert str(other) in str(err.value) and str(paths[2]) in str(err.value)


def test_gantry_tilt(tmp_path, caplog):
    # A 15 degree tilt about x: each slice 2.5 mm up and tan(15) * 2.5 mm along y.
    tilt = np.tan(np.radians(15)) * 2.5
    positions = stack_positions(5, shift=(0.0, tilt, 0.0))
    write_series(tmp_path, positions)
    with pytest.raises(LunaError, match=r"gantry is tilted by 15.00 degrees.*--allow-tilt \(allow_tilt=True"):
        read_dicom_series(tmp_path)
    with caplog.at_level(logging.WARNING, logger="luna.dicom"):
        ct = read_dicom_series(tmp_path, allow_tilt=True)
    assert "tilt" in caplog.text
    np.testing.assert_array_equal(ct.hu, expected_hu(5))
    row_spacing, column_spacing = PIXEL_SPACING
    for k, position in enumerate(positions):
        np.testing.assert_allclose(ct.geometry.irc_to_xyz((k, 0, 0)), position, atol=1e-6)
        expected = position + np.array([3 * column_spacing, 2 * row_spacing, 0.0])
        np.testing.assert_allclose(ct.geometry.irc_to_xyz((k, 2, 3)), expected, atol=1e-6)
        np.testing.assert_allclose(ct.geometry.xyz_to_irc(position), (k, 0, 0), atol=1e-6)


def test_in_plane_jump_is_an_error(tmp_path):
    positions = stack_positions(6)
    positions[3] += (5.0, 0.0, 0.0)
    paths = write_series(tmp_path, positions)
    with pytest.raises(LunaError, match="slices jump in-plane") as err:
        read_dicom_series(tmp_path, allow_tilt=True)
    assert str(paths[3]) in str(err.value)


def test_localizers_and_other_orientations_dropped(tmp_path):
    write_series(tmp_path, stack_positions(4))
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    localizer = ("ORIGINAL", "PRIMARY", "LOCALIZER")
    write_slice(tmp_path / "scout.dcm", (0.0, -200.0, 100.0), orientation=sagittal, image_type=localizer)
    write_slice(tmp_path / "unlabelled.dcm", (0.0, -200.0, 100.0), orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    ct = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(ct.hu, expected_hu(4))
    assert list_dicom_series(tmp_path)[0].slice_count == 4


def as_structured_report(path: Path) -> Path:
    """Turn a written slice into what a structured report is: no image modules, an SR SOP class."""
    ds = pydicom.dcmread(path)
    for keyword in ("PixelData", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns",
                    "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.Modality = "SR"
    ds.save_as(path)
    return path


def test_non_image_files_ignored(tmp_path):
    write_series(tmp_path, stack_positions(3))
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    (tmp_path / "annotations.xml").write_text("<?xml version='1.0'?><LidcReadMessage/>")
    report = write_slice(tmp_path / "report.dcm", (0.0, 0.0, 0.0))  # an SR-like file: no pixels, no geometry
    as_structured_report(report)
    write_slice(tmp_path / ".hidden.dcm", (0.0, 0.0, 500.0))  # would be a gap if read
    (tmp_path / ".git").mkdir()
    write_slice(tmp_path / ".git" / "slice.dcm", (0.0, 0.0, 550.0))
    write_slice(tmp_path / "DICOMDIR", (0.0, 0.0, 600.0))
    ct = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(ct.hu, expected_hu(3))


def test_rescale_applied_per_slice(tmp_path):
    stored = [PATTERN + 1024, PATTERN * 2 + 3000, PATTERN * 4 + 100]
    rescales = [(1, -1024), (0.5, -1500), (0.25, -30.3)]
    for k, ((slope, intercept), pixels) in enumerate(zip(rescales, stored)):
        write_slice(tmp_path / f"{k}.dcm", (0.0, 0.0, 2.5 * k), pixels, slope=slope, intercept=intercept)
    ct = read_dicom_series(tmp_path, hu_range=None)
    expected = [np.rint(p * s + i) for p, (s, i) in zip(stored, rescales)]
    np.testing.assert_array_equal(ct.hu, np.stack(expected))
    clipped = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(clipped.hu, np.clip(np.stack(expected), -1000, 1000))


def test_padding_becomes_air(tmp_path):
    pixels = PATTERN + 1024
    pixels[0, :4] = 7  # PixelPaddingValue .. PixelPaddingRangeLimit (HU -1017 .. -1015)
    pixels[0, 4:6] = 9
    pixels[1, :4] = -2000  # -3024 HU: GE's outside-the-field-of-view value
    pixels[2, :4] = -1024  # -2048 HU (as in LIDC-IDRI-0001)
    pixels[3, :4] = -976  # -2000 HU
    pixels[4, :4] = 10  # -1014 HU: just outside the padding range, kept
    write_slice(tmp_path / "a.dcm", (0.0, 0.0, 0.0), pixels, PixelPaddingValue=7, PixelPaddingRangeLimit=9)
    write_slice(tmp_path / "b.dcm", (0.0, 0.0, 2.5), pixels)
    ct = read_dicom_series(tmp_path, hu_range=None)
    outside = pixels.astype(np.int32) - 1024
    outside[outside <= -2000] = -1000
    np.testing.assert_array_equal(ct.hu[1], outside)  # no PixelPaddingValue
    padded = outside.copy()
    padded[(pixels >= 7) & (pixels <= 9)] = -1000
    np.testing.assert_array_equal(ct.hu[0], padded)
    assert ct.hu[0, 4, 0] == -1014 and ct.hu[0, 0, 0] == -1000 and ct.hu[1, 0, 0] == -1017
    assert np.all(ct.hu[:, 1:4, :4] == -1000)


def test_padding_value_with_the_wrong_vr(tmp_path):
    # LIDC-IDRI-0001 writes PixelPaddingValue -2000 as US 63536 although its pixels are
    # signed; the bit pattern is what counts. Here 65535 as US means -1 stored, i.e. -1 HU.
    pixels = PATTERN.copy()
    pixels[5, :] = -1
    for k in range(2):
        path = write_slice(tmp_path / f"{k}.dcm", (0.0, 0.0, 2.5 * k), pixels, intercept=0)
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "US", 65535)
        ds.save_as(path)
    ct = read_dicom_series(tmp_path, hu_range=None)
    assert np.all(ct.hu[:, 5, :] == -1000)
    assert np.array_equal(ct.hu[:, 6, :], np.stack([PATTERN[6]] * 2))


def test_compressed_without_decoder(tmp_path):
    path = write_slice(tmp_path / "jpeg.dcm", (0.0, 0.0, 0.0), transfer_syntax=JPEGLosslessSV1)
    with pytest.raises(LunaError) as err:
        read_dicom_series(tmp_path)
    message = str(err.value)
    assert str(path) in message and "JPEG Lossless" in message and JPEGLosslessSV1 in message
    assert "pylibjpeg" in message and "luna-nodule[dicom-codecs]" in message and "gdcm" in message


def test_truncated_pixel_data(tmp_path):
    paths = write_series(tmp_path, stack_positions(3))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-100])
    with pytest.raises(LunaError, match="truncated") as err:
        read_dicom_series(tmp_path)
    assert str(paths[1]) in str(err.value)


def test_slice_cut_before_its_pixel_data_is_named(tmp_path):
    # Cut at an element boundary, pydicom reads the rest without complaint; at the end
    # of the series the slice would be lost without a gap to show it.
    paths = write_series(tmp_path, stack_positions(3))
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # up to the PixelData tag
    with pytest.raises(LunaError, match="without pixel data: the file is cut off") as err:
        read_dicom_series(tmp_path)
    assert str(err.value).startswith(str(paths[0]))


@pytest.mark.parametrize("tag", [b"\x28\x00\x10\x00", b"\x08\x00\x3e\x10"], ids=["Rows", "SeriesDescription"])
def test_damaged_value_representation_is_named(tmp_path, tag):
    # pydicom decodes an element when it is first read: a damaged VR raised NotImplementedError through
    # load_ct (found by tests/test_fuzz_inputs.py). Rows is needed: the slice is named; the description is not.
    paths = write_series(tmp_path, stack_positions(3))
    for path in paths[:1] if tag.startswith(b"\x28") else paths:  # the description: in every slice
        data = bytearray(path.read_bytes())
        at = data.index(tag) + 4  # explicit VR little endian: the tag, then two VR letters
        data[at:at + 2] = b"\x55\xa8"
        path.write_bytes(bytes(data))
    if tag.startswith(b"\x28"):
        with pytest.raises(LunaError, match="Unknown Value Representation") as err:
            load_ct(tmp_path)
        assert str(err.value).startswith(str(paths[0])) and "\n" not in str(err.value)
    else:
        assert load_ct(tmp_path).hu.shape[0] == 3


def test_truncated_header_is_named_not_missing_slices(tmp_path):
    paths = write_series(tmp_path, stack_positions(4))
    paths[2].write_bytes(paths[2].read_bytes()[:300])  # cut inside the header
    with pytest.raises(LunaError, match="1 file\\(s\\) that look like DICOM could not be read") as err:
        read_dicom_series(tmp_path)
    assert str(paths[2]) in str(err.value) and "missing slices" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"garbage that is not DICOM" * 10], ids=["empty", "garbage"])
@pytest.mark.parametrize("where", ["middle", "end"])
def test_damaged_dcm_file_is_named(tmp_path, content, where):
    # At the end of the series a lost slice leaves no gap: only naming the file shows it.
    paths = write_series(tmp_path, stack_positions(5))
    damaged = paths[2] if where == "middle" else max(paths, key=lambda p: pydicom.dcmread(p).ImagePositionPatient[2])
    damaged.write_bytes(content)
    with pytest.raises(LunaError) as err:
        read_dicom_series(tmp_path)
    message = str(err.value)
    assert str(damaged) in message and "missing slices" not in message
    assert ("empty file" if not content else "not DICOM") in message


def test_image_without_position_is_named(tmp_path):
    paths = write_series(tmp_path, stack_positions(5))
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    with pytest.raises(LunaError) as err:
        read_dicom_series(tmp_path)
    assert str(err.value).startswith(f"{paths[2]}: cannot use this image's header (no ImagePositionPatient")
    assert "missing slices" not in str(err.value)


@pytest.mark.parametrize("spacing", [(0.0, 0.7), (0.8, -1.0)])
def test_zero_pixel_spacing_is_reported_as_such(tmp_path, spacing):
    paths = write_series(tmp_path, stack_positions(3), pixel_spacing=spacing)
    with pytest.raises(LunaError) as err:
        read_dicom_series(tmp_path)
    message = str(err.value)
    assert "PixelSpacing" in message and "positive" in message and "none" not in message
    assert any(str(p) in message for p in paths)
    with pytest.raises(LunaError, match="PixelSpacing"):
        read_dicom_series(tmp_path, SERIES)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom, on writing the bad values
@pytest.mark.parametrize("slope, intercept", [(0, -1024), ("nan", -1024), (1, "inf")])
def test_unusable_rescale_is_an_error(tmp_path, slope, intercept):
    # RescaleSlope 0 was read as 1 (the "or 1" of a missing value).
    paths = write_series(tmp_path, stack_positions(3))
    ds = pydicom.dcmread(paths[1])
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(paths[1])
    with pytest.raises(LunaError) as err:
        read_dicom_series(tmp_path)
    assert str(err.value).startswith(f"{paths[1]}: ") and "Rescale" in str(err.value)


def test_rescale_absent_means_identity(tmp_path):
    paths = write_series(tmp_path, stack_positions(2), stored=[PATTERN, PATTERN + 10])
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(path)
    np.testing.assert_array_equal(read_dicom_series(tmp_path, hu_range=None).hu, expected_hu(2))


def test_named_pipe_in_the_folder_is_skipped_not_opened(tmp_path):
    import os
    import signal

    write_series(tmp_path, stack_positions(3))
    os.mkfifo(tmp_path / "pipe.dcm")
    (tmp_path / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")

    def hung(*_):
        raise TimeoutError("the reader blocked on the named pipe")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        ct = read_dicom_series(tmp_path)
        infos = list_dicom_series(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    np.testing.assert_array_equal(ct.hu, expected_hu(3))
    assert infos[0].slice_count == 3


def test_decoder_tracebacks_are_not_logged_before_the_error(tmp_path, caplog):
    from pydicom.uid import JPEG2000Lossless

    path = write_slice(tmp_path / "j2k.dcm", (0.0, 0.0, 0.0), transfer_syntax=JPEG2000Lossless)
    write_slice(tmp_path / "j2k-2.dcm", (0.0, 0.0, 2.5), transfer_syntax=JPEG2000Lossless)
    with caplog.at_level(logging.DEBUG), pytest.raises(LunaError, match="JPEG 2000") as err:
        read_dicom_series(tmp_path)
    assert str(path) in str(err.value) or str(tmp_path / "j2k-2.dcm") in str(err.value)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    # The filters are gone afterwards: pydicom's own logging is untouched outside luna's reads.
    assert not logging.getLogger("pydicom.pixels.decoders.base").filters
    assert not logging.getLogger("pydicom").filters


def test_one_dicom_file_instead_of_the_folder(tmp_path):
    paths = write_series(tmp_path / "series", stack_positions(3))
    with pytest.raises(LunaError, match="one file of a DICOM series; give the folder") as err:
        load_ct(paths[0])
    assert str(tmp_path / "series") in str(err.value)
    bare = tmp_path / "series" / "noextension"
    bare.write_bytes(paths[1].read_bytes())
    with pytest.raises(LunaError, match="one file of a DICOM series"):
        load_ct(bare)


def test_a_single_slice_is_not_a_ct_volume(tmp_path):
    write_series(tmp_path, stack_positions(1))
    assert read_dicom_series(tmp_path).hu.shape[0] == 1  # the reader itself reads it...
    with pytest.raises(LunaError, match="a single 16x16 slice, not a CT volume"):
        load_ct(tmp_path)  # ...but no command takes it for a CT


def test_dicom_options_are_refused_for_other_formats(tmp_path):
    from conftest import write_scan

    from luna.geometry import Geometry

    path = write_scan(tmp_path / "a.mhd", np.zeros((3, 4, 5), np.int16), Geometry((0, 0, 0), (1, 1, 1)))
    assert load_ct(path, allow_gaps=False).hu.shape == (3, 4, 5)
    with pytest.raises(LunaError, match=r"a\.mhd: allow_gaps \(--allow-gaps\) applies to DICOM series input only"):
        load_ct(path, allow_gaps=True)
    with pytest.raises(TypeError):
        load_ct(path, allow_everything=True)


def test_matrix_must_agree(tmp_path):
    write_series(tmp_path / "size", stack_positions(3))
    write_slice(tmp_path / "size" / "odd.dcm", stack_positions(4)[3], np.zeros((16, 18), np.int16))
    with pytest.raises(LunaError, match="differ in size.*odd.dcm is 16x18"):
        read_dicom_series(tmp_path / "size")
    write_series(tmp_path / "spacing", stack_positions(3))
    write_slice(tmp_path / "spacing" / "odd.dcm", stack_positions(4)[3], pixel_spacing=(0.5, 0.5))
    with pytest.raises(LunaError, match="differ in PixelSpacing.*odd.dcm"):
        read_dicom_series(tmp_path / "spacing")


def test_folder_errors(tmp_path):
    with pytest.raises(LunaError, match="no such folder"):
        read_dicom_series(tmp_path / "missing")
    with pytest.raises(LunaError, match="no such folder"):
        list_dicom_series(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LunaError, match="not a folder"):
        read_dicom_series(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LunaError, match="no DICOM image series found"):
        read_dicom_series(tmp_path / "empty")
    assert list_dicom_series(tmp_path / "empty") == []
    with pytest.raises(LunaError, match="no DICOM image series found.*1 other file"):
        read_dicom_series(tmp_path)


def test_series_selection_and_listing(tmp_path):
    write_series(tmp_path / "a", stack_positions(3), series_uid="1.2.3.1")
    write_series(tmp_path / "b" / "deeper", stack_positions(5), series_uid="1.2.3.2")
    as_structured_report(write_slice(tmp_path / "b" / "sr.dcm", (0, 0, 0), series_uid="1.2.3.9"))

    infos = list_dicom_series(tmp_path)
    assert infos == [
        DicomSeriesInfo("1.2.3.2", 5, "synthetic", "CT", tmp_path / "b" / "deeper"),
        DicomSeriesInfo("1.2.3.1", 3, "synthetic", "CT", tmp_path / "a"),
    ]
    assert str(infos[0]) == "1.2.3.2 (5 slices, CT, 'synthetic')"
    with pytest.raises(LunaError, match="holds 2 image series: 1.2.3.2 \\(5 slices.*1.2.3.1 \\(3 slices"):
        read_dicom_series(tmp_path)
    assert read_dicom_series(tmp_path, "1.2.3.1").hu.shape == (3, *SHAPE)
    with pytest.raises(LunaError, match="series 1.2.3.9 has no image slices \\(1 without pixel data\\)"):
        read_dicom_series(tmp_path, "1.2.3.9")
    ct = load_ct(tmp_path, series_uid="1.2.3.2", hu_range=None)
    np.testing.assert_array_equal(ct.hu, expected_hu(5))


def test_single_slice_and_file_without_meta_header(tmp_path):
    # An old-style file: no preamble, no meta header, implicit VR little endian.
    bare = Dataset()
    bare.update(pydicom.dcmread(write_slice(tmp_path / "a.dcm", (1.0, 2.0, 3.0))))
    (tmp_path / "a.dcm").unlink()
    bare.save_as(tmp_path / "bare", implicit_vr=True, little_endian=True)
    assert (tmp_path / "bare").read_bytes()[:2] == b"\x08\x00"  # starts with a group 0008 tag
    ct = read_dicom_series(tmp_path)
    assert ct.geometry.spacing_xyz == (0.7, 0.8, 2.5)  # slice spacing from SliceThickness
    assert ct.geometry.origin_xyz == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(ct.hu[0], PATTERN)
