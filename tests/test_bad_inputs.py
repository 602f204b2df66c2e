"""The bad-input corpus: every broken file a user may hand luna, through the real commands.

Each case builds its inputs on the fly and runs ``luna.cli.run_cli(main, argv)`` of
``luna.diagnose``, ``luna.evaluate`` or ``luna.prepcache`` as a user would, and checks
what a user sees: exit status 2; exactly one line on stderr (file descriptor 2, so
what C++ libraries print counts too), ``error: `` and the path of the file at fault,
no traceback, no Python warning; and nothing under the output or cache folder, and
no temporary ``*.partial*`` file anywhere. A timer turns a hang (a named pipe opened)
into a failure.

Two cases also run as subprocesses (``python -m luna.<command>``), to check that the
in-process runs show what a fresh process prints.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from conftest import write_scan
from test_dicom import PATTERN, SERIES, stack_positions, write_series, write_slice

from luna.cli import run_cli
from luna.diagnose.__main__ import main as diagnose_main
from luna.evaluate.__main__ import main as evaluate_main
from luna.geometry import Geometry
from luna.models import NoduleClassifier, SegmentationUNet, make_checkpoint, save_checkpoint
from luna.prepcache import main as prepcache_main

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = Geometry((-40.0, -50.0, -60.0), (0.8, 0.8, 2.0))
SHAPE = (6, 20, 24)  # index, row, col
UID = "1.2.826.0.1.3680043.8.498.77"
RESULTS_HEADER = "seriesuid,coordX,coordY,coordZ,probability\n"
ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
CAND_HEADER = "seriesuid,coordX,coordY,coordZ,class\n"
MAL_HEADER = ("seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool,mal_details,"
              "bboxLowX,bboxLowY,bboxLowZ,bboxHighX,bboxHighY,bboxHighZ,len_mal_details\n")
MALIGNANCY_HEADER = "seriesuid,coordX,coordY,coordZ,probability,label\n"


@dataclass(frozen=True)
class Bad:
    """One bad input: the command and its arguments, the file the error must name."""

    main: Callable
    argv: list[str]
    names: Path
    contains: tuple[str, ...] = ()


CASES: dict[str, Callable[[Path, dict], Bad]] = {}


def case(name: str):
    def register(build):
        assert name not in CASES
        CASES[name] = build
        return build
    return register


# -- helpers that build the inputs -------------------------------------------------------


def volume(shape=SHAPE, dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)) % 1500 - 1000).astype(dtype).reshape(shape)


def chest(shape=SHAPE) -> np.ndarray:
    """A tiny chest in HU: room air around a body of soft tissue holding air-filled lungs."""
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[:, 3:17, 3:21] = 40
    hu[:, 6:14, 6:18] = -850
    hu[:, 14:17, 10:14] = 700  # the spine
    return hu


def good_mhd(folder: Path, name: str = f"{UID}.mhd", **kwargs) -> Path:
    return write_scan(folder / name, volume(), GEOMETRY, **kwargs)


def edit_header(path: Path, **fields) -> Path:
    """Replace, add (before ElementDataFile, which ends a header) or with None drop header lines."""
    lines, todo = [], dict(fields)
    for line in path.read_text().splitlines():
        key = line.partition("=")[0].strip()
        if key == "ElementDataFile":
            lines += [f"{k} = {v}" for k, v in todo.items() if v is not None]
            todo.clear()
        if key in fields:
            if todo.pop(key, None) is not None:
                lines.append(f"{key} = {fields[key]}")
        else:
            lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


def diagnose(tmp_path: Path, models: dict, *source: str) -> list[str]:
    return [*source, "--segmentation-path", str(models["segmentation"]), "--classification-path",
            str(models["nodule"]), "--no-malignancy", "--device", "cpu", "--out", str(tmp_path / "out")]


def image_case(tmp_path, models, path: Path, *contains: str, names: Path | None = None) -> Bad:
    return Bad(diagnose_main, diagnose(tmp_path, models, "--image", str(path)), names or path, contains)


def dicom_case(tmp_path, models, folder: Path, *contains: str, names: Path | None = None, extra=()) -> Bad:
    return Bad(diagnose_main, diagnose(tmp_path, models, "--dicom", str(folder), *extra), names or folder, contains)


def evaluate(tmp_path: Path, *args: str) -> list[str]:
    return [*args, "--bootstrap", "0", "--no-plot", "--out", str(tmp_path / "out")]


def csv_file(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def good_results(tmp_path: Path) -> Path:
    return csv_file(tmp_path / "results.csv", RESULTS_HEADER + "a,0,0,0,0.9\nb,100,0,0,0.2\n")


def good_annotations(tmp_path: Path) -> Path:
    return csv_file(tmp_path / "annotations.csv", ANN_HEADER + "a,0,0,0,10\nb,0,0,0,8\n")


def froc_case(tmp_path, *, results=None, annotations=None, extra=(), names=None, contains=()) -> Bad:
    results = results or good_results(tmp_path)
    annotations = annotations or good_annotations(tmp_path)
    argv = evaluate(tmp_path, "--results", str(results), "--annotations", str(annotations), *extra)
    return Bad(evaluate_main, argv, names or results, contains)


def data_dir(tmp_path: Path, **csvs: str | bytes) -> Path:
    """A data directory with one good scan; ``csvs`` gives the CSV files by name."""
    root = tmp_path / "data"
    good_mhd(root / "subset0")
    defaults = {"candidates.csv": CAND_HEADER + f"{UID},-30,-40,-55,0\n{UID},-20,-40,-55,1\n",
                "annotations.csv": ANN_HEADER + f"{UID},-20,-40,-55,6\n"}
    for name, text in {**defaults, **{k.replace("__", "."): v for k, v in csvs.items()}}.items():
        if text is not None:
            csv_file(root / name, text)
    return root


def prepcache_case(tmp_path, bad_name: str, **csvs) -> Bad:
    root = data_dir(tmp_path, **csvs)
    argv = ["--data-dir", str(root), "--cache-dir", str(tmp_path / "out" / "cache"), "--num-workers", "0",
            "--no-progress"]
    return Bad(prepcache_main, argv, root / bad_name)


def dicom_series(folder: Path, n: int = 3, **options) -> list[Path]:
    return write_series(folder, stack_positions(n), **options)


def set_tags(path: Path, **tags) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def nifti(path: Path, data: np.ndarray) -> Path:
    return write_scan(path, data, GEOMETRY)


# -- MetaImage ---------------------------------------------------------------------------------


@case("mhd-dimsize-disagrees-with-raw")
def _(tmp_path, models):
    # The case: 96 48 46 on 96x96x46 data was diagnosed as a scrambled volume.
    path = write_scan(tmp_path / "scan.mhd", volume((46, 96, 96)), GEOMETRY)
    return image_case(tmp_path, models, edit_header(path, DimSize="96 48 46"), "does not describe this data")


@case("mhd-uchar-header-on-int16-data")
def _(tmp_path, models):
    path = edit_header(good_mhd(tmp_path), ElementType="MET_UCHAR")
    return image_case(tmp_path, models, path, "MET_UCHAR")


@case("mhd-zero-slices")
def _(tmp_path, models):
    path = edit_header(good_mhd(tmp_path), DimSize=f"{SHAPE[2]} {SHAPE[1]} 0")
    return image_case(tmp_path, models, path, "holds no image")


@case("mhd-one-slice")
def _(tmp_path, models):
    path = write_scan(tmp_path / "one.mhd", volume((1, 20, 24)), GEOMETRY)
    return image_case(tmp_path, models, path, "not a CT volume")


@case("mhd-two-slices")
def _(tmp_path, models):
    # Two 2.5 mm slices through LIDC-IDRI-0001's 23 mm nodule were diagnosed "no nodule found", exit 0.
    path = write_scan(tmp_path / "two.mhd", volume((2, 20, 24)), GEOMETRY)
    return image_case(tmp_path, models, path, "cover only 4.0 mm along z", "give the whole series")


@case("mhd-truncated-raw")
def _(tmp_path, models):
    path = good_mhd(tmp_path)
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    return image_case(tmp_path, models, path, "truncated", str(raw))


@case("mhd-raw-missing")
def _(tmp_path, models):
    path = good_mhd(tmp_path)
    path.with_suffix(".raw").unlink()
    return image_case(tmp_path, models, path, "missing")


@case("mhd-raw-is-a-folder")
def _(tmp_path, models):
    path = good_mhd(tmp_path)
    path.with_suffix(".raw").unlink()
    path.with_suffix(".raw").mkdir()
    return image_case(tmp_path, models, path, names=path.with_suffix(".raw"))


@case("mhd-zero-spacing")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), ElementSpacing="0 0.8 2"), "ElementSpacing")


@case("mhd-nan-spacing")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), ElementSpacing="nan 0.8 2"), "ElementSpacing")


@case("mhd-inf-origin")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), Offset="0 inf 0"), "Offset")


@case("mhd-singular-direction")
def _(tmp_path, models):
    path = edit_header(good_mhd(tmp_path), TransformMatrix="1 0 0 1 0 0 0 0 1")
    return image_case(tmp_path, models, path, "direction")


@case("mhd-ndims-2")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), NDims="2", DimSize="24 20"), "NDims")


@case("mhd-unknown-element-type")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), ElementType="MET_STRING"), "ElementType")


@case("mhd-no-dimsize")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), DimSize=None), "DimSize")


@case("mhd-garbage-dimsize")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), DimSize="24 twenty 6"), "DimSize")


@case("mhd-beyond-memory")
def _(tmp_path, models):
    # 100 slices of 40000x40000 with a data file of that size (sparse: 320 GB that take no disk): read until the
    # allocation failed, and the message then said the file was damaged or truncated.
    path = edit_header(good_mhd(tmp_path), DimSize="40000 40000 100")
    raw = next(line.partition("=")[2].strip() for line in path.read_text().splitlines()
               if line.startswith("ElementDataFile"))
    os.truncate(tmp_path / raw, 40000 * 40000 * 100 * 2)
    return image_case(tmp_path, models, path, "100 slices of 40000x40000 voxels need about", "GiB of memory is free")


@case("mhd-header-size-past-the-data")
def _(tmp_path, models):
    return image_case(tmp_path, models, edit_header(good_mhd(tmp_path), HeaderSize="100"), "truncated",
                      names=tmp_path / f"{UID}.raw")


@case("mhd-empty-file")
def _(tmp_path, models):
    path = tmp_path / "empty.mhd"
    path.write_bytes(b"")
    return image_case(tmp_path, models, path, "ElementDataFile")


@case("mhd-binary-garbage")
def _(tmp_path, models):
    path = tmp_path / "garbage.mhd"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return image_case(tmp_path, models, path)


@case("mhd-is-a-folder")
def _(tmp_path, models):
    path = tmp_path / "folder.mhd"
    path.mkdir()
    return image_case(tmp_path, models, path)


@case("mhd-named-pipe")
def _(tmp_path, models):
    path = tmp_path / "pipe.mhd"
    os.mkfifo(path)
    return image_case(tmp_path, models, path, "not a regular file")


@case("mhd-compressed-truncated")
def _(tmp_path, models):
    path = good_mhd(tmp_path, compress=True)
    data = path.with_suffix(".zraw")
    data.write_bytes(data.read_bytes()[:-20])
    return image_case(tmp_path, models, path, "CompressedDataSize", names=data)


@case("mhd-compressed-corrupt")
def _(tmp_path, models):
    # ITK prints "Uncompress failed" and returns an image of zeros.
    path = good_mhd(tmp_path, compress=True)
    data = path.with_suffix(".zraw")
    data.write_bytes(bytes(len(data.read_bytes())))
    return image_case(tmp_path, models, path)


@case("mhd-compressed-without-size-truncated")
def _(tmp_path, models):
    path = edit_header(good_mhd(tmp_path, compress=True), CompressedDataSize=None)
    data = path.with_suffix(".zraw")
    data.write_bytes(zlib.compress(volume().tobytes())[:-30])
    return image_case(tmp_path, models, path, "truncated", names=data)


@case("mha-truncated")
def _(tmp_path, models):
    path = write_scan(tmp_path / "scan.mha", volume(), GEOMETRY)
    path.write_bytes(path.read_bytes()[:-100])
    return image_case(tmp_path, models, path, "truncated")


@case("mha-three-channels")
def _(tmp_path, models):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([24, 20, 6], sitk.sitkVectorUInt8, 3), str(path))
    return image_case(tmp_path, models, path, "greyscale")


@case("mha-float-nan")
def _(tmp_path, models):
    data = volume(dtype=np.float32)
    data[2, 3, 4] = np.nan
    return image_case(tmp_path, models, write_scan(tmp_path / "f.mha", data, GEOMETRY), "NaN")


@case("mha-eight-bit-export")
def _(tmp_path, models):
    # Grey levels 0-255, not HU (an 8-bit export): no air anywhere, and it was diagnosed "no nodule found", exit 0.
    data = (volume() % 256 + 256) % 256
    return image_case(tmp_path, models, write_scan(tmp_path / "export.mha", data.astype(np.uint8), GEOMETRY),
                      "no voxel below -400 HU", "convert it to HU")


@case("mha-blank")
def _(tmp_path, models):
    # All air, no patient (a blank export): diagnosed "no nodule found", exit 0.
    return image_case(tmp_path, models, write_scan(tmp_path / "blank.mha", np.full(SHAPE, -1000, np.int16), GEOMETRY),
                      "0.00% of the voxels at or above -400 HU", "holds no patient")


@case("mha-inverted-hu")
def _(tmp_path, models):
    # HU negated (air +1000, lungs +850, the spine -700): diagnosed "no nodule found", exit 0.
    return image_case(tmp_path, models, write_scan(tmp_path / "inverted.mha", -chest(), GEOMETRY),
                      "denser than bone", "inverted")


@case("mha-hu-times-ten")
def _(tmp_path, models):
    # HU multiplied by 10 (a wrong rescale slope): LIDC-IDRI-0001 so got 33 accepted "nodules", exit 0.
    return image_case(tmp_path, models, write_scan(tmp_path / "tenfold.mha", 10 * chest(), GEOMETRY),
                      "of the tissue voxels", "scaled")


@case("mhd-spacing-in-cm")
def _(tmp_path, models):
    # ElementSpacing written in cm: a 512-pixel chest 35 mm wide, diagnosed "no nodule found", exit 0.
    path = edit_header(good_mhd(tmp_path), ElementSpacing="0.08 0.08 0.2")
    return image_case(tmp_path, models, path, "0.08 x 0.08 x 0.2 mm", "is the header in cm or m")


# -- NIfTI ---------------------------------------------------------------------------------------


@case("nifti-float-nan")
def _(tmp_path, models):
    # ITK reads NaN as 0: the "NaN voxels silently become 0 HU".
    data = volume(dtype=np.float32)
    data[1, 2, 3] = np.nan
    return image_case(tmp_path, models, nifti(tmp_path / "ct.nii.gz", data), "NaN")


@case("nifti-float-inf-uncompressed")
def _(tmp_path, models):
    data = volume(dtype=np.float64)
    data[4, 5, 6] = -np.inf
    return image_case(tmp_path, models, nifti(tmp_path / "ct.nii", data), "infinite")


@case("nifti-gz-truncated")
def _(tmp_path, models):
    path = nifti(tmp_path / "ct.nii.gz", volume())
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return image_case(tmp_path, models, path, "truncated")


@case("nifti-truncated")
def _(tmp_path, models):
    path = nifti(tmp_path / "ct.nii", volume())
    path.write_bytes(path.read_bytes()[:-500])
    return image_case(tmp_path, models, path, "truncated")


@case("nifti-random-bytes")
def _(tmp_path, models):
    path = tmp_path / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(3000))
    return image_case(tmp_path, models, path, "NIfTI")


@case("nifti-empty")
def _(tmp_path, models):
    path = tmp_path / "empty.nii"
    path.write_bytes(b"")
    return image_case(tmp_path, models, path, "NIfTI")


@case("nifti-nan-scale")
def _(tmp_path, models):
    path = nifti(tmp_path / "ct.nii", volume())
    data = bytearray(path.read_bytes())
    data[112:116] = struct.pack("<f", float("nan"))  # scl_slope
    path.write_bytes(bytes(data))
    return image_case(tmp_path, models, path, "scl_slope")


@case("nifti-zero-slice-spacing")
def _(tmp_path, models):
    path = nifti(tmp_path / "ct.nii", volume())
    data = bytearray(path.read_bytes())
    data[88:92] = struct.pack("<f", 0.0)  # pixdim[3], the slice spacing: ITK would read 1 mm
    path.write_bytes(bytes(data))
    return image_case(tmp_path, models, path, "voxel size (pixdim)")


@case("nifti-nan-voxel-size")
def _(tmp_path, models):
    path = nifti(tmp_path / "ct.nii.gz", volume())
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[80:84] = struct.pack("<f", float("nan"))  # pixdim[1]
    path.write_bytes(gzip.compress(bytes(data)))
    return image_case(tmp_path, models, path, "voxel size (pixdim)")


def four_d(path: Path) -> Path:
    """Two time points of a chest in one 4D image (a dynamic series exported whole), in ``path``'s format."""
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([chest(), chest()]), isVector=False), str(path))
    return path


@case("nifti-four-d")
def _(tmp_path, models):
    # Refused before too, but the message said only "expected a 3D greyscale CT", not what to do.
    return image_case(tmp_path, models, four_d(tmp_path / "dynamic.nii.gz"), "4D image", "save a single 3D volume")


@case("mha-four-d")
def _(tmp_path, models):
    return image_case(tmp_path, models, four_d(tmp_path / "dynamic.mha"), "NDims = 4", "save a single 3D volume")


@case("mha-sagittal-stack")
def _(tmp_path, models):
    # The same chest with its axes permuted so that the slices are sagittal: was diagnosed, exit 0, "no lungs found".
    image = sitk.GetImageFromArray(chest((24, 20, 24)))
    image.SetSpacing((0.7, 0.7, 2.0))
    path = tmp_path / "sagittal.mha"
    sitk.WriteImage(sitk.PermuteAxes(image, [1, 2, 0]), str(path))
    return image_case(tmp_path, models, path, "slices are sagittal", "reformat it to an axial series")


@case("nifti-one-slice")
def _(tmp_path, models):
    return image_case(tmp_path, models, nifti(tmp_path / "slice.nii.gz", volume((1, 20, 24))), "not a CT volume")


@case("image-unknown-suffix")
def _(tmp_path, models):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n")
    return image_case(tmp_path, models, path, "not a CT luna reads")


@case("image-missing")
def _(tmp_path, models):
    return image_case(tmp_path, models, tmp_path / "nowhere.nii.gz", "no such file")


# -- DICOM -----------------------------------------------------------------------------------


@case("dicom-one-file-not-the-folder")
def _(tmp_path, models):
    paths = dicom_series(tmp_path / "series")
    return dicom_case(tmp_path, models, paths[0], "give the folder")


@case("dicom-single-slice")
def _(tmp_path, models):
    dicom_series(tmp_path / "series", 1)
    return dicom_case(tmp_path, models, tmp_path / "series", "not a CT volume")


@case("dicom-rescale-slope-zero")
def _(tmp_path, models):
    paths = dicom_series(tmp_path / "series")
    set_tags(paths[1], RescaleSlope=0)
    return dicom_case(tmp_path, models, tmp_path / "series", "RescaleSlope", names=paths[1])


@case("dicom-mr-series")
def _(tmp_path, models):
    # An MR series has no Hounsfield units; it was diagnosed as a CT, with exit 0.
    paths = dicom_series(tmp_path / "series")
    for path in paths:
        set_tags(path, Modality="MR")
    return dicom_case(tmp_path, models, tmp_path / "series", "MR image(s), not CT")


@case("dicom-no-position")
def _(tmp_path, models):
    paths = dicom_series(tmp_path / "series", 5)
    set_tags(paths[2], ImagePositionPatient=None)
    return dicom_case(tmp_path, models, tmp_path / "series", "ImagePositionPatient", names=paths[2])


@case("dicom-empty-dcm")
def _(tmp_path, models):
    paths = dicom_series(tmp_path / "series", 5)
    paths[2].write_bytes(b"")
    return dicom_case(tmp_path, models, tmp_path / "series", "empty file", names=paths[2])


@case("dicom-truncated-header")
def _(tmp_path, models):
    paths = dicom_series(tmp_path / "series", 4)
    paths[3].write_bytes(paths[3].read_bytes()[:300])
    return dicom_case(tmp_path, models, tmp_path / "series", names=paths[3])


@case("dicom-truncated-pixels")
def _(tmp_path, models):
    paths = dicom_series(tmp_path / "series", 3)
    paths[0].write_bytes(paths[0].read_bytes()[:-100])
    return dicom_case(tmp_path, models, tmp_path / "series", "truncated", names=paths[0])


@case("dicom-pixel-spacing-zero")
def _(tmp_path, models):
    dicom_series(tmp_path / "series", 3, pixel_spacing=(0.0, 0.0))
    return dicom_case(tmp_path, models, tmp_path / "series", "PixelSpacing")


@case("dicom-pixel-spacing-in-cm")
def _(tmp_path, models):
    # PixelSpacing written in cm while the positions are in mm: diagnosed like a header in cm (mhd-spacing-in-cm).
    air_and_tissue = (PATTERN % 2) * 1064  # stored values: -1024 and 40 HU, a CT in HU
    write_series(tmp_path / "series", stack_positions(3), stored=[air_and_tissue] * 3, pixel_spacing=(0.07, 0.07))
    return dicom_case(tmp_path, models, tmp_path / "series", "0.07 x 0.07", "is the header in cm or m")


@case("dicom-only-a-named-pipe")
def _(tmp_path, models):
    (tmp_path / "series").mkdir()
    os.mkfifo(tmp_path / "series" / "slice.dcm")
    return dicom_case(tmp_path, models, tmp_path / "series", "no DICOM image series")


@case("dicom-missing-slice")
def _(tmp_path, models):
    write_series(tmp_path / "series", np.delete(stack_positions(6), 3, axis=0))
    return dicom_case(tmp_path, models, tmp_path / "series", "--allow-gaps")


@case("dicom-gantry-tilt")
def _(tmp_path, models):
    write_series(tmp_path / "series", stack_positions(5, shift=(0.0, 0.7, 0.0)))
    return dicom_case(tmp_path, models, tmp_path / "series", "--allow-tilt")


@case("dicom-non-uniform-spacing")
def _(tmp_path, models):
    write_series(tmp_path / "series", [(-10.0, -20.0, z) for z in (0.0, 2.5, 5.0, 8.0, 10.5, 13.0)])
    return dicom_case(tmp_path, models, tmp_path / "series", "--allow-nonuniform")


@case("dicom-gap-and-allow-tilt-only")
def _(tmp_path, models):
    write_series(tmp_path / "series", np.delete(stack_positions(6), 3, axis=0))
    return dicom_case(tmp_path, models, tmp_path / "series", "--allow-gaps", extra=("--allow-tilt",))


@case("dicom-empty-folder")
def _(tmp_path, models):
    (tmp_path / "series").mkdir()
    return dicom_case(tmp_path, models, tmp_path / "series", "no DICOM image series")


@case("dicom-folder-missing")
def _(tmp_path, models):
    return dicom_case(tmp_path, models, tmp_path / "nowhere", "no such file or folder")


@case("dicom-jpeg2000-undecodable")
def _(tmp_path, models):
    from pydicom.uid import JPEG2000Lossless

    folder = tmp_path / "series"
    folder.mkdir()
    first = write_slice(folder / "a.dcm", (0.0, 0.0, 0.0), transfer_syntax=JPEG2000Lossless)
    write_slice(folder / "b.dcm", (0.0, 0.0, 2.5), transfer_syntax=JPEG2000Lossless)
    return dicom_case(tmp_path, models, folder, "JPEG 2000", names=first)


@case("dicom-unknown-series-uid")
def _(tmp_path, models):
    dicom_series(tmp_path / "series")
    return dicom_case(tmp_path, models, tmp_path / "series", SERIES, extra=("--dicom-series", "9.9.9"))


@case("dicom-slices-of-two-sizes")
def _(tmp_path, models):
    dicom_series(tmp_path / "series", 3)
    odd = write_slice(tmp_path / "series" / "odd.dcm", stack_positions(4)[3], np.zeros((16, 18), np.int16))
    return dicom_case(tmp_path, models, tmp_path / "series", "differ in size", names=odd)


@case("dicom-allow-option-on-an-image")
def _(tmp_path, models):
    path = good_mhd(tmp_path)
    return Bad(diagnose_main, diagnose(tmp_path, models, "--dicom", str(path), "--allow-gaps"), path, ("DICOM",))


# -- scans of a data directory ------------------------------------------------------------------


@case("data-dir-truncated-scan")
def _(tmp_path, models):
    root = data_dir(tmp_path)
    raw = root / "subset0" / f"{UID}.raw"
    raw.write_bytes(raw.read_bytes()[:500])
    argv = diagnose(tmp_path, models, "--series-uid", UID, "--data-dir", str(root))
    return Bad(diagnose_main, argv, raw, ("truncated",))


@case("data-dir-unknown-series")
def _(tmp_path, models):
    root = data_dir(tmp_path)
    return Bad(diagnose_main, diagnose(tmp_path, models, "--series-uid", "9.9.9", "--data-dir", str(root)), root)


@case("data-dir-is-a-file")
def _(tmp_path, models):
    path = csv_file(tmp_path / "data.csv", "x\n")
    return Bad(diagnose_main, diagnose(tmp_path, models, "--series-uid", UID, "--data-dir", str(path)), path)


# -- LUNA16 CSVs through luna.evaluate -----------------------------------------------------------


@case("annotations-diameter-zero")
def _(tmp_path, models):
    ann = csv_file(tmp_path / "ann.csv", ANN_HEADER + "a,0,0,0,10\nb,0,0,0,0\n")
    return froc_case(tmp_path, annotations=ann, names=ann, contains=("ann.csv:3", "positive diameter"))


@case("annotations-diameter-negative")
def _(tmp_path, models):
    ann = csv_file(tmp_path / "ann.csv", ANN_HEADER + "a,0,0,0,-1\n")
    return froc_case(tmp_path, annotations=ann, names=ann, contains=("ann.csv:2",))


@case("annotations-duplicated-rows")
def _(tmp_path, models):
    # Every row twice: the CPM 0.969 -> 0.485 without a word.
    ann = csv_file(tmp_path / "ann.csv", ANN_HEADER + "a,0,0,0,10\nb,0,0,0,8\n" * 2)
    return froc_case(tmp_path, annotations=ann, names=ann, contains=("line 4 repeats line 2", "line 5 repeats line 3"))


@case("annotations-not-utf8")
def _(tmp_path, models):
    ann = csv_file(tmp_path / "ann.csv", ANN_HEADER.encode() + "a,0,0,0,10 mm\u00b2\n".encode("latin-1"))
    return froc_case(tmp_path, annotations=ann, names=ann, contains=("UTF-8",))


@case("annotations-nul-bytes")
def _(tmp_path, models):
    ann = csv_file(tmp_path / "ann.csv", ANN_HEADER.encode() + b"a,0,0\x00,0,10\n")
    return froc_case(tmp_path, annotations=ann, names=ann)


@case("annotations-missing")
def _(tmp_path, models):
    return froc_case(tmp_path, annotations=tmp_path / "ann.csv", names=tmp_path / "ann.csv", contains=("not found",))


@case("excluded-nan-diameter")
def _(tmp_path, models):
    exc = csv_file(tmp_path / "excluded.csv", ANN_HEADER + "a,100,0,0,-1\na,200,0,0,nan\n")
    return froc_case(tmp_path, extra=("--excluded", str(exc)), names=exc, contains=("excluded.csv:3",))


@case("results-probability-above-one")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", RESULTS_HEADER + "a,0,0,0,0.5\na,10,0,0,1.5\n")
    return froc_case(tmp_path, results=res, names=res, contains=("res.csv:3", "between 0 and 1"))


@case("results-probability-negative")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", RESULTS_HEADER + "a,0,0,0,-0.25\n")
    return froc_case(tmp_path, results=res, names=res, contains=("res.csv:2",))


@case("results-probability-nan")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", RESULTS_HEADER + "a,0,0,0,nan\n")
    return froc_case(tmp_path, results=res, names=res, contains=("res.csv:2", "finite"))


@case("results-coordinate-inf")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", RESULTS_HEADER + "a,0,-inf,0,0.5\n")
    return froc_case(tmp_path, results=res, names=res, contains=("coordY",))


@case("results-empty-file")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", "")
    return froc_case(tmp_path, results=res, names=res, contains=("empty",))


@case("results-binary-garbage")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", np.random.default_rng(2).bytes(2000))
    return froc_case(tmp_path, results=res, names=res)


@case("results-is-a-folder")
def _(tmp_path, models):
    res = tmp_path / "res.csv"
    res.mkdir()
    return froc_case(tmp_path, results=res, names=res, contains=("folder",))


@case("results-named-pipe")
def _(tmp_path, models):
    res = tmp_path / "res.csv"
    os.mkfifo(res)
    return froc_case(tmp_path, results=res, names=res, contains=("not a regular file",))


@case("results-missing-column")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", "seriesuid,coordX,coordY,coordZ,score\na,0,0,0,0.5\n")
    return froc_case(tmp_path, results=res, names=res, contains=("probability",))


@case("results-short-row")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", RESULTS_HEADER + "a,0,0,0,0.5\na,0,0\n")
    return froc_case(tmp_path, results=res, names=res, contains=("res.csv:3",))


@case("results-bom-crlf-bad-value")
def _(tmp_path, models):
    # A spreadsheet's export: BOM, CRLF; still the right line named.
    res = csv_file(tmp_path / "res.csv", "\ufeff" + RESULTS_HEADER.replace("\n", "\r\n") + "a,0,0,0,0.5\r\na,0,x,0,0.5\r\n")
    return froc_case(tmp_path, results=res, names=res, contains=("res.csv:3", "coordY"))


@case("results-semicolon-separated")
def _(tmp_path, models):
    res = csv_file(tmp_path / "res.csv", RESULTS_HEADER.replace(",", ";") + "a;0;0;0;0.5\n")
    return froc_case(tmp_path, results=res, names=res, contains=("header",))


@case("series-list-with-commas")
def _(tmp_path, models):
    series = csv_file(tmp_path / "series.txt", "a\nb,c\n")
    return froc_case(tmp_path, extra=("--series", str(series)), names=series, contains=("series.txt:2",))


@case("series-list-empty")
def _(tmp_path, models):
    series = csv_file(tmp_path / "series.txt", "# nothing\n\n")
    return froc_case(tmp_path, extra=("--series", str(series)), names=series)


@case("malignancy-one-class")
def _(tmp_path, models):
    mal = csv_file(tmp_path / "mal.csv", MALIGNANCY_HEADER + "a,0,0,0,0.9,0\nb,0,0,0,0.2,0\n")
    return Bad(evaluate_main, evaluate(tmp_path, "--malignancy", str(mal)), mal, ("both",))


@case("malignancy-label-two")
def _(tmp_path, models):
    mal = csv_file(tmp_path / "mal.csv", MALIGNANCY_HEADER + "a,0,0,0,0.9,1\nb,0,0,0,0.2,2\n")
    return Bad(evaluate_main, evaluate(tmp_path, "--malignancy", str(mal)), mal, ("mal.csv:3",))


@case("malignancy-no-rows")
def _(tmp_path, models):
    mal = csv_file(tmp_path / "mal.csv", MALIGNANCY_HEADER)
    return Bad(evaluate_main, evaluate(tmp_path, "--malignancy", str(mal)), mal, ("no nodules",))


@case("malignancy-probability-out-of-range")
def _(tmp_path, models):
    mal = csv_file(tmp_path / "mal.csv", MALIGNANCY_HEADER + "a,0,0,0,3.5,1\nb,0,0,0,0.2,0\n")
    return Bad(evaluate_main, evaluate(tmp_path, "--malignancy", str(mal)), mal, ("mal.csv:2",))


# -- LUNA16 CSVs of a data directory through luna.prepcache --------------------------------------


@case("prepcache-annotation-diameter-zero")
def _(tmp_path, models):
    return prepcache_case(tmp_path, "annotations.csv", annotations__csv=ANN_HEADER + f"{UID},-20,-40,-55,0\n")


@case("prepcache-annotation-repeated")
def _(tmp_path, models):
    return prepcache_case(tmp_path, "annotations.csv", annotations__csv=ANN_HEADER + f"{UID},-20,-40,-55,6\n" * 2)


@case("prepcache-candidate-class-two")
def _(tmp_path, models):
    return prepcache_case(tmp_path, "candidates.csv", candidates__csv=CAND_HEADER + f"{UID},-30,-40,-55,2\n")


@case("prepcache-candidate-nan")
def _(tmp_path, models):
    return prepcache_case(tmp_path, "candidates.csv", candidates__csv=CAND_HEADER + f"{UID},nan,-40,-55,0\n")


@case("prepcache-candidates-empty")
def _(tmp_path, models):
    return prepcache_case(tmp_path, "candidates.csv", candidates__csv=b"")


@case("prepcache-malignancy-flag")
def _(tmp_path, models):
    row = f'{UID},-20,-40,-55,6,maybe,"[4, 4]",0,0,0,1,1,1,2\n'
    return prepcache_case(tmp_path, "annotations_with_malignancy.csv",
                          annotations_with_malignancy__csv=MAL_HEADER + row)


@case("prepcache-malignancy-diameter-negative")
def _(tmp_path, models):
    row = f'{UID},-20,-40,-55,-1,True,"[4, 4]",0,0,0,1,1,1,2\n'
    return prepcache_case(tmp_path, "annotations_with_malignancy.csv",
                          annotations_with_malignancy__csv=MAL_HEADER + row)


@case("prepcache-annotations-is-a-folder")
def _(tmp_path, models):
    root = data_dir(tmp_path, annotations__csv=None)
    (root / "annotations.csv").mkdir()
    argv = ["--data-dir", str(root), "--cache-dir", str(tmp_path / "out" / "cache"), "--num-workers", "0",
            "--no-progress"]
    return Bad(prepcache_main, argv, root / "annotations.csv")


@case("checkpoint-not-a-checkpoint")
def _(tmp_path, models):
    # the models load after --out is checked: the failed command must not leave an empty --out behind
    bad = tmp_path / "cls.pt"
    bad.write_text("not a checkpoint")
    argv = diagnose(tmp_path, models, "--image", str(good_mhd(tmp_path)))
    argv[argv.index("--classification-path") + 1] = str(bad)
    return Bad(diagnose_main, argv, bad)


# -- the checks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Small untrained checkpoints: the commands check their files before reading the CT."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    return {
        "segmentation": save_checkpoint(root / "seg.pt", make_checkpoint(SegmentationUNet(depth=2, wf=2),
                                                                         stage="segmentation")),
        "nodule": save_checkpoint(root / "cls.pt", make_checkpoint(NoduleClassifier(), stage="nodule")),
    }


@contextlib.contextmanager
def as_a_fresh_process():
    """Logging and warnings as ``python -m luna.<command>`` has them.

    run_cli's logging.basicConfig does nothing under pytest (its handlers are already
    on the root logger), so INFO lines would not reach stderr; a handler on the
    captured stderr puts them there. Warnings are recorded (pytest would swallow
    them). An alarm turns a hang into an error.
    """
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    def hung(*_):
        raise TimeoutError("the command hung (a named pipe opened?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        root.removeHandler(handler)
        root.setLevel(level)


def written_files(tmp_path: Path) -> list[Path]:
    """What a failed command left: files, or the empty ``--out`` folder itself."""
    out = tmp_path / "out"
    left = ([p for p in out.rglob("*") if p.is_file()] or [out]) if out.exists() else []
    return left + [p for p in tmp_path.rglob("*partial*")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_naming_the_file(name, tmp_path, models, capfd):
    bad = CASES[name](tmp_path, models)
    capfd.readouterr()
    with as_a_fresh_process() as caught:
        code = run_cli(bad.main, bad.argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and str(bad.names) in lines[0], lines[0]
    for text in bad.contains:
        assert text in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not [str(w.message) for w in caught]
    assert not written_files(tmp_path)


def test_the_corpus_is_large():
    assert len(CASES) >= 50


@pytest.mark.parametrize("command, build", [("luna.evaluate", "results-probability-above-one"),
                                            ("luna.diagnose", "nifti-float-nan")])
def test_a_fresh_process_prints_the_same_one_line(command, build, tmp_path, models):
    bad = CASES[build](tmp_path, models)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", command, *bad.argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad.names) in lines[0], done.stderr
    assert not written_files(tmp_path)


def test_a_pipe_or_odd_file_in_a_dicom_folder_does_not_stop_a_good_series(tmp_path, models, capfd):
    """The good case beside the corpus: what is skipped is skipped without a word on stderr."""
    dicom_series(tmp_path / "series", 3, stored=[PATTERN + 1024] * 3)
    os.mkfifo(tmp_path / "series" / "pipe")
    shutil.copy(REPO / "README.md", tmp_path / "series" / "README.md")
    from luna.io import load_ct

    with as_a_fresh_process() as caught:
        ct = load_ct(tmp_path / "series")
    assert ct.hu.shape == (3, 16, 16) and not caught
