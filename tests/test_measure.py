"""The nodule diameter measured on the CT (`luna.inference.measure`)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from luna.ct import Ct
from luna.geometry import Geometry
from luna.inference.measure import Extent, nodule_diameter_mm, nodule_extent
from luna.inference.merge import distinct_findings
from luna.io import load_ct

UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def _chest(spacing_xyz=(0.7, 0.7, 2.5), shape=(40, 96, 96), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seed=0):
    """Lung parenchyma (-850 HU with noise) and the grid's patient coordinates (i, r, c, 3)."""
    rng = np.random.default_rng(seed)
    geometry = Geometry(origin_xyz=(-30.0, 20.0, -100.0), spacing_xyz=spacing_xyz, direction=direction)
    hu = (-850 + rng.normal(0, 25, shape)).astype(np.float32)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = geometry.irc_to_xyz(index.astype(float)).reshape(*shape, 3)
    return hu, geometry, xyz


def _ct(hu, geometry):
    return Ct(np.clip(hu, -1000, 1000).astype(np.int16), geometry, "1.2.3")


@pytest.mark.parametrize("diameter, density", [(6.0, 40), (12.0, 40), (20.0, 40), (16.0, -600)])
def test_a_sphere_measures_its_diameter_also_with_a_vessel_touching_it(diameter, density):
    hu, geometry, xyz = _chest()
    center = geometry.irc_to_xyz((20.0, 48.0, 48.0))
    hu[np.linalg.norm(xyz - center, axis=-1) <= diameter / 2] = density
    # a 3 mm vessel along the col axis that touches the sphere's side
    offset = np.array([0.0, diameter / 2 + 1.0, 0.0])
    hu[np.linalg.norm((xyz - center - offset)[..., 1:], axis=-1) <= 1.5] = 40
    measured = nodule_diameter_mm(_ct(hu, geometry), center)
    assert measured == pytest.approx(diameter, rel=0.12)


def test_the_direction_matrix_and_the_slice_spacing_do_not_change_the_measure():
    results = []
    for spacing, direction in [((0.7, 0.7, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                               ((0.7, 0.7, 0.7), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                               ((0.7, 0.7, 2.5), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
                               ((0.8, 0.8, 1.25), (0, 1, 0, 1, 0, 0, 0, 0, 1))]:
        shape = (int(40 * 2.5 / spacing[2]), 96, 96)
        hu, geometry, xyz = _chest(spacing, shape, direction)
        center = geometry.irc_to_xyz((shape[0] / 2, 48.0, 48.0))
        hu[np.linalg.norm(xyz - center, axis=-1) <= 7.0] = 30
        results.append(nodule_diameter_mm(_ct(hu, geometry), center))
    assert max(results) - min(results) < 1.5 and results[0] == pytest.approx(14.0, rel=0.1)


def test_nothing_to_measure_gives_none():
    hu, geometry, xyz = _chest()
    ct = _ct(hu, geometry)
    assert nodule_diameter_mm(ct, geometry.irc_to_xyz((20.0, 48.0, 48.0))) is None  # lung only
    assert nodule_diameter_mm(ct, (1e4, 1e4, 1e4)) is None  # outside the CT


def test_the_real_lidc_nodule_measures_its_luna16_diameter(shared_data):
    ct = load_ct(sorted((shared_data / "lidc-idri" / "LIDC-IDRI-0001").glob("*/*/"))[0])
    table = (shared_data / "luna16" / "annotations.csv").read_text().splitlines()
    rows = [r for r in csv.DictReader(table) if r["seriesuid"] == UID_0001]
    in_slab = [r for r in rows if ct.geometry.xyz_to_irc([float(r[k]) for k in ("coordX", "coordY", "coordZ")])[0]
               == pytest.approx(8, abs=8)]
    assert len(in_slab) == 1
    row = in_slab[0]
    measured = nodule_diameter_mm(ct, [float(row[k]) for k in ("coordX", "coordY", "coordZ")])
    assert measured == pytest.approx(float(row["diameter_mm"]), rel=0.15)


@pytest.mark.parametrize("offset_mm", [4.0, 9.0, 10.5])
def test_a_piece_off_a_large_nodules_centre_measures_from_the_nodules_centre(offset_mm):
    """LIDC-IDRI-0001's 23 mm nodule came as detections 9-10 mm off its centre, each reading 10-16 mm."""
    hu, geometry, xyz = _chest(shape=(40, 112, 112))
    center = geometry.irc_to_xyz((20.0, 56.0, 56.0))
    hu[np.linalg.norm(xyz - center, axis=-1) <= 11.5] = 40
    hu[np.linalg.norm((xyz - center - np.array([0.0, 12.0, 0.0]))[..., 1:], axis=-1) <= 1.2] = 40  # a vessel
    ct = _ct(hu, geometry)
    piece = center + np.array([offset_mm, 0.0, 0.0])
    extent = nodule_extent(ct, piece)
    assert nodule_diameter_mm(ct, piece) < extent.diameter_mm - 1.0
    assert extent.recentred
    assert np.linalg.norm(np.array(extent.center_xyz) - center) < 1.0
    assert extent.diameter_mm == pytest.approx(23.0, rel=0.08)
    assert nodule_extent(ct, piece, recentre=False) == Extent(tuple(piece), nodule_diameter_mm(ct, piece), False)


def test_pieces_of_one_nodule_merge_and_two_nodules_side_by_side_do_not():
    hu, geometry, xyz = _chest(shape=(40, 112, 112))
    a = geometry.irc_to_xyz((20.0, 56.0, 36.0))
    b = a + np.array([22.0, 0.0, 0.0])  # 22 mm apart: 1.1 times the sum of their radii, as close as in LUNA16
    for c in (a, b):
        hu[np.linalg.norm(xyz - c, axis=-1) <= 10.0] = 40
    ct = _ct(hu, geometry)
    detections = [a + (7.0, 0, 0), a + (0, 7.0, 0), a + (0, 0, -3.0), b + (0, -7.0, 0), b + (-7.0, 0, 0)]
    extents = [nodule_extent(ct, d) for d in detections]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    keep = distinct_findings([e.center_xyz for e in extents], [e.diameter_mm for e in extents], scores)
    assert keep.tolist() == [True, False, False, True, False]


def test_a_detection_on_the_chest_wall_keeps_its_centre():
    """The wall is no compact structure: the opened tissue reaches the box's faces, twice."""
    hu, geometry, xyz = _chest(shape=(40, 96, 96))
    wall = geometry.irc_to_xyz((20.0, 48.0, 48.0))
    hu[xyz[..., 0] > wall[0]] = 40
    ct = _ct(hu, geometry)
    on_wall = wall + np.array([3.0, 0.0, 0.0])
    extent = nodule_extent(ct, on_wall)
    assert not extent.recentred and extent.center_xyz == tuple(on_wall)
