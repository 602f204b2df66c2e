"""The nodule diameter measured on the CT (`luna.inference.measure`)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from luna.ct import Ct
from luna.geometry import Geometry
from luna.inference.measure import nodule_diameter_mm
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
