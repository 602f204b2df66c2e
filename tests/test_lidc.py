"""LIDC XML reader, outline masks, and our nodule mask against the radiologists' outlines."""

from __future__ import annotations

import numpy as np
import pytest

from luna.annotations import Annotation
from luna.ct import Ct
from luna.errors import LunaError
from luna.geometry import Geometry
from luna.io import load_ct
from luna.io.luna16 import read_malignancy_annotations
from luna.lidc import (
    LidcNodule,
    LidcRoi,
    compare_with_readers,
    dice_per_slice,
    nodule_center_xyz,
    nodules_near,
    read_lidc_xml,
    roi_mask,
)
from luna.masks import nodule_mask

SERIES_1 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
SERIES_2 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"
LUNA_CENTER = (56.208, 86.343, -115.868)
LUNA_DIAMETER = 23.35


def _series_folder(shared_data, patient: str):
    folders = [p.parent for p in (shared_data / "lidc-idri" / patient).glob("*/*/annotations.xml")]
    assert len(folders) == 1
    return folders[0]


@pytest.fixture(scope="module")
def case1(shared_data):
    folder = _series_folder(shared_data, "LIDC-IDRI-0001")
    return read_lidc_xml(folder / "annotations.xml"), load_ct(folder)


@pytest.fixture(scope="module")
def case2(shared_data):
    folder = _series_folder(shared_data, "LIDC-IDRI-0002")
    return read_lidc_xml(folder / "annotations.xml"), load_ct(folder)


@pytest.fixture(scope="module")
def big_nodule(case1):
    """The four readers' outlines of the LUNA16-annotated nodule, and their masks on the slab."""
    message, ct = case1
    near = nodules_near(message, ct.geometry, LUNA_CENTER, 15.0)
    return near, [roi_mask(nodule, ct) for _, nodule in near]


# ---------------------------------------------------------------------- real XML


def test_reads_lidc_idri_0001(case1):
    message, ct = case1
    assert message.series_uid == SERIES_1 == ct.series_uid
    assert len(message.readings) == 4
    assert [len(r.nodules) for r in message.readings] == [4, 1, 4, 4]
    assert [len(r.non_nodules) for r in message.readings] == [4, 1, 8, 0]
    first = message.readings[0]
    assert first.reader_id == "540461523"
    nodule = first.nodules[0]
    assert nodule.nodule_id == "Nodule 001" and nodule.malignancy == 5
    assert nodule.characteristics == {
        "subtlety": 5, "internalStructure": 1, "calcification": 6, "sphericity": 3, "margin": 3,
        "lobulation": 3, "spiculation": 4, "texture": 5, "malignancy": 5,
    }
    roi = nodule.rois[0]
    assert roi.z_mm == -125.0  # written "-125.000000 " in the file
    assert roi.inclusion and roi.sop_uid.endswith(".110383487652933113465768208719")
    assert roi.points_rc[0].tolist() == [355, 312]  # (row, col) = (yCoord, xCoord)
    small = first.nodules[1]  # < 3 mm: no characteristics, one point
    assert small.malignancy is None and small.characteristics == {}
    assert len(small.rois) == 1 and small.rois[0].points_rc.shape == (1, 2)
    non_nodule = first.non_nodules[0]
    assert non_nodule.z_mm == -185.0 and non_nodule.locus_rc == (216, 396)


def test_reads_lidc_idri_0002_with_holes_and_nothing_annotated_in_luna16(case2):
    message, ct = case2
    assert message.series_uid == SERIES_2 == ct.series_uid
    assert len(message.readings) == 4
    nodules = [n for r in message.readings for n in r.nodules]
    assert len(nodules) == 28
    holes = [roi for n in nodules for roi in n.rois if not roi.inclusion]
    assert len(holes) == 2
    # The one large nodule was outlined by two readers only (LUNA16 needs three), and
    # its top slices reach into the slab.
    large = [n for n in nodules if len(n.rois) > 1]
    assert len(large) == 2 and sorted(n.malignancy for n in large) == [4, 5]
    for nodule in large:
        assert roi_mask(nodule, ct).any()
    for nodule in nodules:
        mask = roi_mask(nodule, ct)
        assert mask.shape == ct.hu.shape
        if len(nodule.rois) == 1 and len(nodule.rois[0].points_rc) == 1:
            assert np.count_nonzero(mask) <= 1  # a point: one voxel, or none outside the slab


# ------------------------------------------------------------- the LUNA16 nodule


def test_readers_outline_the_luna16_nodule(case1, big_nodule, shared_data):
    message, ct = case1
    near, masks = big_nodule
    assert len(near) == 4 and len({reading.reader_id for reading, _ in near}) == 4
    center = tuple(ct.geometry.xyz_to_irc_int(LUNA_CENTER))
    for (reading, nodule), mask in zip(near, masks):
        assert mask.any(), reading.reader_id
        assert mask[center] or mask[tuple(slice(c - 1, c + 2) for c in center)].any(), reading.reader_id
        assert np.linalg.norm(nodule_center_xyz(nodule, ct.geometry) - LUNA_CENTER) < 3.0
    ratings = sorted(nodule.malignancy for _, nodule in near)
    assert ratings == [4, 5, 5, 5]
    luna = [a for a in read_malignancy_annotations(shared_data / "luna16" / "annotations_with_malignancy.csv")
            if a.series_uid == SERIES_1]
    assert len(luna) == 1 and sorted(luna[0].malignancy_ratings) == ratings and luna[0].is_malignant


def test_our_mask_agrees_with_the_readers(case1, big_nodule):
    message, ct = case1
    _, readers = big_nodule
    ours = nodule_mask(ct, [Annotation(ct.series_uid, LUNA_CENTER, LUNA_DIAMETER)])
    dice = compare_with_readers(ours, readers)
    print()
    for name, per_slice in dice.items():
        cells = " ".join(f"{k}:{v:.2f}" for k, v in per_slice.items())
        print(f"  {name:9s} mean {np.mean(list(per_slice.values())):.3f} | {cells}")
    # Measured (default parameters, outline pixels included): per reader 0.72, 0.89,
    # 0.82, 0.71; majority 0.77 (0.84-0.88 on the six middle slices, 0.3-0.7 at the
    # nodule's ends, where the real nodule is wider than the sphere's caps); union 0.64.
    majority = dice["majority"]
    assert np.mean(list(majority.values())) > 0.7
    assert np.median(list(majority.values())) > 0.8
    for k in range(4):
        assert np.mean(list(dice[f"reader {k + 1}"].values())) > 0.6
    # Where the readers drew, we drew.
    assert set(np.flatnonzero(ours.any(axis=(1, 2)))) >= set(majority)


# ------------------------------------------------------------ rasterising rules


def _flat_ct(shape=(3, 40, 40), spacing=(0.7, 0.7, 2.5), origin=(-10.0, -10.0, -50.0)) -> Ct:
    return Ct(np.zeros(shape, np.int16), Geometry(origin, spacing), "flat")


def _square(r0, c0, r1, c1) -> np.ndarray:
    """Outline pixels of a square, clockwise, as LIDC lists them."""
    top = [(r0, c) for c in range(c0, c1 + 1)]
    right = [(r, c1) for r in range(r0 + 1, r1 + 1)]
    bottom = [(r1, c) for c in range(c1 - 1, c0 - 1, -1)]
    left = [(r, c0) for r in range(r1 - 1, r0, -1)]
    return np.array(top + right + bottom + left)


def test_polygon_fill_conventions_and_holes():
    ct = _flat_ct()
    outer = LidcRoi(-47.5, "a", True, _square(10, 10, 20, 20))
    hole = LidcRoi(-47.5, "a", False, _square(13, 13, 17, 17))
    nodule = LidcNodule("n", 3, {"malignancy": 3}, (outer,))
    with_outline = roi_mask(nodule, ct)
    assert np.count_nonzero(with_outline) == 11 * 11
    assert with_outline[1, 10:21, 10:21].all() and not with_outline[0].any() and not with_outline[2].any()
    assert np.count_nonzero(roi_mask(nodule, ct, include_outline=False)) == 9 * 9
    holed = LidcNodule("n", 3, {}, (outer, hole))
    # The hole's own outline stays nodule when outlines count as nodule.
    assert np.count_nonzero(roi_mask(holed, ct)) == 11 * 11 - 3 * 3
    assert np.count_nonzero(roi_mask(holed, ct, include_outline=False)) == 9 * 9 - 5 * 5


def test_polygon_partly_outside_the_image_is_clipped():
    ct = _flat_ct()
    mask = roi_mask(LidcNodule("e", None, {}, (LidcRoi(-50.0, "", True, _square(-3, 35, 5, 45)),)), ct)
    assert np.count_nonzero(mask) == 6 * 5 and mask[0, 0:6, 35:40].all()


def test_polygon_with_sparse_vertices_and_odd_shape():
    ct = _flat_ct()
    diamond = np.array([(5, 20), (15, 30), (25, 20), (15, 10)])  # corners only
    mask = roi_mask(LidcNodule("d", None, {}, (LidcRoi(-50.0, "", True, diamond),)), ct)[0]
    rows, cols = np.mgrid[0:40, 0:40]
    expected = np.abs(rows - 15) + np.abs(cols - 20) <= 10
    np.testing.assert_array_equal(mask, expected)


def test_rois_are_placed_by_z_and_skipped_outside():
    ct = _flat_ct()  # slices at z = -50, -47.5, -45
    points = _square(5, 5, 8, 8)
    expected = {-52.6: None, -51.0: 0, -48.8: 0, -48.7: 1, -46.4: 1, -44.0: 2, -43.7: None}
    for z, index in expected.items():
        mask = roi_mask(LidcNodule("z", None, {}, (LidcRoi(z, "", True, points),)), ct)
        assert [i for i in range(3) if mask[i].any()] == ([] if index is None else [index]), z
    # Slices stacked downwards: the first slice is the highest.
    flipped = Ct(ct.hu, Geometry((10.0, 10.0, -45.0), (0.7, 0.7, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, -1)), "f")
    mask = roi_mask(LidcNodule("z", None, {}, (LidcRoi(-50.0, "", True, points),)), flipped)
    assert mask[2].any() and not mask[:2].any()


def test_dice_per_slice():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2] = True
    b[0, :1] = True
    b[2, 0, 0] = True
    assert dice_per_slice(a, b) == {0: pytest.approx(2 * 4 / 12), 2: 0.0}
    assert compare_with_readers(a, [a, b])["majority"] == {0: pytest.approx(2 * 4 / 12)}


# ---------------------------------------------------------------------- errors


def _write(tmp_path, text: str):
    path = tmp_path / "annotations.xml"
    path.write_text(text)
    return path


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(LunaError, match="nothere.xml"):
        read_lidc_xml(tmp_path / "nothere.xml")
    bad = _write(tmp_path, "<LidcReadMessage><readingSession>")
    with pytest.raises(LunaError, match="annotations.xml.*XML"):
        read_lidc_xml(bad)
    other = _write(tmp_path, "<Something/>")
    with pytest.raises(LunaError, match="LidcReadMessage"):
        read_lidc_xml(other)
    number = _write(
        tmp_path,
        "<LidcReadMessage><readingSession><servicingRadiologistID>7</servicingRadiologistID>"
        "<unblindedReadNodule><noduleID>N1</noduleID><roi><imageZposition>abc</imageZposition>"
        "</roi></unblindedReadNodule></readingSession></LidcReadMessage>",
    )
    with pytest.raises(LunaError, match=r"imageZposition.*'N1'.*'7'"):
        read_lidc_xml(number)


def test_without_namespace_and_optional_elements(tmp_path):
    path = _write(
        tmp_path,
        """<?xml version="1.0"?>
<LidcReadMessage>
 <readingSession>
  <unblindedReadNodule>
   <noduleID> 7 </noduleID>
   <characteristics><malignancy> 3 </malignancy><texture></texture></characteristics>
   <roi>
    <imageZposition> -12.5 </imageZposition>
    <edgeMap><xCoord> 4 </xCoord><yCoord>5 </yCoord></edgeMap>
   </roi>
  </unblindedReadNodule>
 </readingSession>
 <readingSession/>
</LidcReadMessage>""",
    )
    message = read_lidc_xml(path)
    assert message.series_uid == "" and len(message.readings) == 2
    reading = message.readings[0]
    assert reading.reader_id == "" and reading.non_nodules == ()
    nodule = reading.nodules[0]
    assert nodule.nodule_id == "7" and nodule.malignancy == 3 and nodule.characteristics == {"malignancy": 3}
    roi = nodule.rois[0]
    assert roi.z_mm == -12.5 and roi.inclusion and roi.sop_uid == "" and roi.points_rc.tolist() == [[5, 4]]
    assert message.readings[1].nodules == ()
