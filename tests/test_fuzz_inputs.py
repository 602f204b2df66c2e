"""Property-based fuzzing of the input parsers (hypothesis): garbage in, `LunaError` out.

- the LUNA16 CSV readers: any bytes give records or a one-line `LunaError` naming the
  file; valid records survive a write and a read unchanged;
- MetaImage headers: any header (keys from MetaIO's vocabulary with good and bad
  values, data files of any size) gives a CT of the header's size or a `LunaError`,
  never an exception of another type, a hang or a scrambled volume; what SimpleITK
  writes reads back voxel for voxel;
- NIfTI files and DICOM slices damaged at random: a CT or a `LunaError`;
- `Geometry`: any numbers give a `ValueError` or a geometry whose maps are finite,
  and voxel -> mm -> voxel is the identity on well-conditioned ones.

Examples are drawn from a fixed seed (``derandomize``) so a run never fails by luck;
hypothesis keeps no example database, and its caches go to the temporary folder,
not the working directory.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import logging
import math
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")

import SimpleITK as sitk  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

# Hypothesis caches (constants, unicode tables) in ./.hypothesis by default: keep the
# working tree out of it.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "luna-hypothesis")

from luna.errors import LunaError  # noqa: E402
from luna.geometry import Geometry  # noqa: E402
from luna.io import load_ct  # noqa: E402
from luna.io.luna16 import (  # noqa: E402
    ANNOTATION_COLUMNS,
    CANDIDATE_COLUMNS,
    MALIGNANCY_HEADER,
    RESULTS_COLUMNS,
    read_annotations,
    read_candidate_columns,
    read_excluded_annotations,
    read_malignancy_annotations,
    read_malignancy_results,
    read_results,
    read_series_list,
    write_csv,
)


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fresh(tmp_path: Path) -> Path:
    """A new folder per example (hypothesis runs many examples in one test)."""
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    return folder


def one_line_naming(err: LunaError, path: Path) -> None:
    message = str(err)
    assert "\n" not in message and str(path) in message, message


READERS = [read_annotations, read_excluded_annotations, read_malignancy_annotations, read_candidate_columns,
           read_results, read_malignancy_results, read_series_list]
HEADERS = [",".join(ANNOTATION_COLUMNS), ",".join(MALIGNANCY_HEADER), ",".join(CANDIDATE_COLUMNS),
           ",".join(RESULTS_COLUMNS), ",".join(RESULTS_COLUMNS) + ",label", ""]
CELL = st.one_of(
    st.sampled_from(["", " ", "0", "1", "-1", "0.5", "1e400", "nan", "inf", "-inf", "True", "False", "1.2.3",
                     '"[4, 2]"', '"a,b"', "[", "\ufeff", "x"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
)


@fuzz(150)
@given(reader=st.sampled_from(READERS), header=st.sampled_from(HEADERS),
       rows=st.lists(st.lists(CELL, max_size=15), max_size=6),
       line_end=st.sampled_from(["\n", "\r\n", "\r"]), raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_csv_readers_give_records_or_one_luna_error(tmp_path, reader, header, rows, line_end, raw):
    path = fresh(tmp_path) / "file.csv"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(line_end.join([header, *(",".join(r) for r in rows)]) + line_end, encoding="utf-8")
    try:
        reader(path)
    except LunaError as err:
        one_line_naming(err, path)


UIDS = st.from_regex(r"[1-9][0-9]{0,3}(\.[0-9]{1,4}){0,6}", fullmatch=True)
FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
POSITIVE = st.floats(min_value=1e-3, max_value=100, allow_nan=False)
PROBABILITY = st.floats(min_value=0, max_value=1, allow_nan=False)


@fuzz(60)
@given(rows=st.lists(st.tuples(UIDS, FINITE, FINITE, FINITE, POSITIVE, PROBABILITY, st.booleans()), max_size=20))
def test_csv_round_trip(tmp_path, rows):
    folder = fresh(tmp_path)
    # Nodules are unique by series and centre (a repeat is an error, tested elsewhere).
    rows = list({(uid, x, y, z): (uid, x, y, z, d, p, c) for uid, x, y, z, d, p, c in rows}.values())
    write_csv(folder / "a.csv", ANNOTATION_COLUMNS, [(u, repr(x), repr(y), repr(z), repr(d)) for u, x, y, z, d, _, _ in rows])
    assert [(a.series_uid, *a.center_xyz, a.diameter_mm) for a in read_annotations(folder / "a.csv")] == \
        [r[:5] for r in rows]
    write_csv(folder / "m.csv", MALIGNANCY_HEADER,
              [(u, repr(x), repr(y), repr(z), repr(d), c, "[4, 1]", 0, 0, 0, 1, 1, 1, 2) for u, x, y, z, d, _, c in rows])
    assert [(a.is_malignant, a.malignancy_ratings) for a in read_malignancy_annotations(folder / "m.csv")] == \
        [(c, (4, 1)) for *_, c in rows]
    write_csv(folder / "r.csv", RESULTS_COLUMNS, [(u, repr(x), repr(y), repr(z), repr(p)) for u, x, y, z, _, p, _ in rows])
    results = read_results(folder / "r.csv")
    assert results.series_uids == [r[0] for r in rows]
    np.testing.assert_array_equal(results.probability, [r[5] for r in rows])
    write_csv(folder / "c.csv", CANDIDATE_COLUMNS, [(u, repr(x), repr(y), repr(z), int(c)) for u, x, y, z, _, _, c in rows])
    candidates = read_candidate_columns(folder / "c.csv")
    np.testing.assert_array_equal(candidates.center_xyz.reshape(-1, 3), np.array([r[1:4] for r in rows]).reshape(-1, 3))
    assert candidates.is_nodule.tolist() == [r[6] for r in rows]


# -- MetaImage ----------------------------------------------------------------------------------

ELEMENT_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_LONG": 4,
                 "MET_FLOAT": 4, "MET_DOUBLE": 8}
NUMBER_TEXT = st.one_of(st.integers(-3, 9).map(str), st.sampled_from(["0", "1", "2.5", "-1", "nan", "inf", "x", ""]))


def numbers(count: int) -> st.SearchStrategy[str]:
    return st.one_of(st.lists(NUMBER_TEXT, min_size=count, max_size=count).map(" ".join),
                     st.lists(NUMBER_TEXT, max_size=count + 1).map(" ".join))


@st.composite
def metaimage_headers(draw):
    """A header as MetaIO writes one, each line mostly good, sometimes dropped or given a bad value.

    Mostly good, so that most examples get past the first check and reach the data
    size check and ITK; every line bad often enough to be tried.
    """
    dims = draw(st.lists(st.integers(0, 6), min_size=3, max_size=3))
    element = draw(st.sampled_from(list(ELEMENT_TYPES)))
    channels = draw(st.sampled_from([1, 1, 1, 2]))
    compressed = draw(st.sampled_from(["False", "False", "False", "True"]))
    fields = {  # key: (good value, bad values, may be left out)
        "ObjectType": ("Image", st.just("Image"), True),
        "NDims": ("3", st.sampled_from(["2", "4", "three", ""]), False),
        "BinaryData": ("True", st.sampled_from(["False", "yes"]), True),
        "BinaryDataByteOrderMSB": ("False", st.sampled_from(["True"]), True),
        "CompressedData": (compressed, st.sampled_from(["maybe"]), True),
        "TransformMatrix": ("1 0 0 0 1 0 0 0 1", numbers(9), True),
        "Offset": ("0 0 0", numbers(3), True),
        "ElementSpacing": ("1 1 2.5", numbers(3), True),
        "DimSize": (" ".join(map(str, dims)), numbers(3), False),
        "HeaderSize": ("0", st.sampled_from(["-1", "16", "x"]), True),
        "ElementNumberOfChannels": (str(channels), st.sampled_from(["0", "-1", "x"]), True),
        "ElementType": (element, st.sampled_from(["MET_STRING", "MET_FLOAT_ARRAY", "short", ""]), False),
    }
    lines = []
    for key, (good, bad, optional) in fields.items():
        die = draw(st.integers(0, 19))
        if die == 0 and optional:
            continue
        lines.append(f"{key} = {draw(bad) if die == 1 else good}")
    data = draw(st.sampled_from(["scan.raw"] * 4 + ["LOCAL"] * 3 + ["missing.raw", "LIST", "slice%03d.raw"]))
    lines.append(f"ElementDataFile = {data}")
    voxels = math.prod(dims) * ELEMENT_TYPES[element] * channels
    size = draw(st.one_of(st.just(voxels), st.just(voxels), st.integers(0, 2 * voxels + 64)))
    return "\n".join(lines) + "\n", data, size, dims


@fuzz(200)
@given(header=metaimage_headers(), seed=st.integers(0, 2**32 - 1))
def test_metaimage_headers_give_a_ct_of_their_size_or_one_luna_error(tmp_path, header, seed):
    text, data, size, dims = header
    folder = fresh(tmp_path)
    path = folder / ("scan.mha" if data == "LOCAL" else "scan.mhd")
    payload = np.random.default_rng(seed).bytes(size)
    if data == "LOCAL":
        path.write_bytes(text.encode() + payload)
    else:
        path.write_text(text)
        if data == "scan.raw":
            (folder / data).write_bytes(payload)
    try:
        ct = load_ct(path)
    except LunaError as err:
        one_line_naming(err, folder)
        return
    # Read: then the header was one luna accepts, and the volume is what it says.
    assert ct.hu.dtype == np.int16 and ct.hu.shape == tuple(dims[::-1])
    assert "NDims = 3" in text and data in ("scan.raw", "LOCAL")


@fuzz(40)
@given(shape=st.tuples(st.integers(2, 5), st.integers(1, 6), st.integers(1, 6)),
       pixel=st.sampled_from(["sitkInt16", "sitkUInt8", "sitkInt32", "sitkFloat32", "sitkFloat64"]),
       name=st.sampled_from(["a.mhd", "a.mha", "a.nii", "a.nii.gz"]), compress=st.booleans(),
       origin=st.tuples(FINITE, FINITE, FINITE), spacing=st.tuples(POSITIVE, POSITIVE, POSITIVE),
       angles=st.tuples(*[st.floats(-math.pi, math.pi)] * 3), seed=st.integers(0, 2**32 - 1))
def test_what_simpleitk_writes_reads_back_voxel_for_voxel(tmp_path, shape, pixel, name, compress, origin, spacing,
                                                          angles, seed):
    image = sitk.Image(list(shape[::-1]), getattr(sitk, pixel))
    values = np.random.default_rng(seed).integers(-1200, 1200, shape)
    array = values.astype(sitk.GetArrayViewFromImage(image).dtype) if "UInt" not in pixel else (values % 250)
    written = sitk.GetImageFromArray(np.asarray(array, dtype=sitk.GetArrayViewFromImage(image).dtype))
    direction = rotation(*angles)
    written.SetOrigin(origin)
    written.SetSpacing(spacing)
    written.SetDirection(tuple(direction.ravel()))
    path = fresh(tmp_path) / name
    sitk.WriteImage(written, str(path), useCompression=compress)
    ct = load_ct(path, hu_range=None)
    np.testing.assert_array_equal(ct.hu, np.clip(np.rint(sitk.GetArrayViewFromImage(written)), -32768, 32767))
    np.testing.assert_allclose(ct.geometry.origin_xyz, origin, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(ct.geometry.spacing_xyz, spacing, rtol=1e-5)


def rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


@fuzz(80)
@given(name=st.sampled_from(["a.nii", "a.nii.gz"]), float_voxels=st.booleans(),
       cut=st.one_of(st.none(), st.integers(0, 2000)),
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_damaged_nifti_gives_a_ct_or_one_luna_error(tmp_path, name, float_voxels, cut, flips):
    volume = np.arange(4 * 5 * 6, dtype=np.float32 if float_voxels else np.int16).reshape(4, 5, 6)
    path = fresh(tmp_path) / name
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
    original = path.read_bytes()
    if name == "a.nii.gz":  # damage the header inside the stream, not the gzip framing
        original = gzip.decompress(original)
    data = damaged(original, flips, cut)
    path.write_bytes(gzip.compress(data) if name == "a.nii.gz" else data)
    ct = ct_or_one_luna_error(path, path)
    if ct is not None:
        assert ct.hu.ndim == 3 and ct.hu.dtype == np.int16
        assert len(data) == len(original), "a truncated file was read"


@fuzz(60)
@given(slice_index=st.integers(0, 2), cut=st.one_of(st.none(), st.integers(0, 900)),
       flips=st.lists(st.tuples(st.integers(0, 900), st.integers(0, 255)), max_size=4))
def test_damaged_dicom_slice_gives_a_ct_or_one_luna_error(tmp_path, slice_index, cut, flips):
    from test_dicom import stack_positions, write_series

    folder = fresh(tmp_path)
    paths = write_series(folder, stack_positions(3))
    original = paths[slice_index].read_bytes()
    data = damaged(original, flips, cut)
    paths[slice_index].write_bytes(data)
    ct = ct_or_one_luna_error(folder, folder)
    if ct is not None:
        assert ct.hu.shape[1:] == (16, 16)
        # The pixel data ends the file: any cut loses some.
        assert len(data) == len(original), "a truncated slice was read"


def damaged(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    """``data`` with bytes overwritten at (offset, value) and cut to ``cut`` bytes."""
    out = bytearray(data)
    for offset, value in flips:
        out[offset % len(out)] = value
    return bytes(out if cut is None else out[:cut])


def ct_or_one_luna_error(path: Path, named: Path):
    """`load_ct(path)` quietly, or None after checking its `LunaError` is one line naming ``named``."""
    try:
        with quietly():
            return load_ct(path)
    except LunaError as err:
        one_line_naming(err, named)
        return None


@contextlib.contextmanager
def quietly():
    """Fails the example when a library warns or logs at WARNING or above: a user would see those before
    luna's one line on stderr. luna's own warnings (e.g. relaying one of ITK's) are meant to be seen."""
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeHandler(handler)
    assert not [str(w.message) for w in caught]
    assert not handler.records, [r.getMessage() for r in handler.records]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("luna"):
            self.records.append(record)


# -- Geometry -------------------------------------------------------------------------------------

ANY_FLOAT = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1e-320, 1e-300, 1e300, math.nan, math.inf]))


@fuzz(300)
@given(origin=st.lists(ANY_FLOAT, min_size=2, max_size=4), spacing=st.lists(ANY_FLOAT, min_size=3, max_size=3),
       direction=st.lists(ANY_FLOAT, min_size=9, max_size=9))
def test_geometry_refuses_or_maps_finitely(origin, spacing, direction):
    try:
        geometry = Geometry(tuple(origin), tuple(spacing), tuple(direction))
    except ValueError:
        return
    assert len(origin) == 3 and all(math.isfinite(v) for v in itertools.chain(origin, spacing, direction))
    with np.errstate(over="ignore"):
        xyz = geometry.irc_to_xyz((1.0, 2.0, 3.0))
        irc = geometry.xyz_to_irc(geometry.origin_xyz)
    assert np.isfinite(irc).all() and (np.isfinite(xyz).all() or max(map(abs, origin)) > 1e300)


@fuzz(150)
@given(origin=st.tuples(FINITE, FINITE, FINITE), spacing=st.tuples(*[st.floats(0.05, 20)] * 3),
       angles=st.tuples(*[st.floats(-math.pi, math.pi)] * 3), shear=st.floats(-0.5, 0.5),
       irc=st.tuples(*[st.floats(-1000, 1000)] * 3))
def test_geometry_round_trip(origin, spacing, angles, shear, irc):
    # A rotation, sheared as gantry tilt shears the slice axis (unit columns, not orthogonal).
    direction = rotation(*angles)
    tilted = direction[:, 2] + shear * direction[:, 1]
    direction[:, 2] = tilted / np.linalg.norm(tilted)
    geometry = Geometry(origin, spacing, direction.ravel())
    np.testing.assert_allclose(geometry.xyz_to_irc(geometry.irc_to_xyz(irc)), irc, atol=1e-6)
    xyz = np.add(origin, 10.0)
    np.testing.assert_allclose(geometry.irc_to_xyz(geometry.xyz_to_irc(xyz)), xyz, atol=1e-6)
