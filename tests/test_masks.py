"""nodule_mask on hand-made volumes and synthetic scans; MaskSource caching."""

from __future__ import annotations

import csv
import logging
import math
import os

import numpy as np
import pytest
from conftest import write_scan

import luna.masks
from luna.annotations import Annotation, load_annotations
from luna.cache import ArrayCache, encode_array
from luna.ct import Ct
from luna.datadir import DataDir
from luna.geometry import Geometry
from luna.io.image import read_image
from luna.masks import MaskParams, MaskSource, ScanMask, build_scan_mask, nodule_mask

UID = "1.3.6.1.4.1.99.7"
LUNG_HU, NODULE_HU, WALL_HU = -850, 40, 40


def _xyz_grid(geometry: Geometry, shape) -> np.ndarray:
    irc = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return geometry.irc_to_xyz(irc)


def _scene(
    shape=(40, 48, 48),
    spacing=(1.0, 1.0, 1.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    spheres=(),
    noise=15.0,
    seed=0,
    wall_x=None,
):
    """A lung-like volume with spheres ``(center_xyz, radius_mm, hu)`` drawn in patient mm.

    ``wall_x``: voxels with x >= wall_x are chest wall (dense). Returns the Ct and the
    distance of every voxel to each sphere centre (mm).
    """
    geometry = Geometry((-20.0, -24.0, -100.0), spacing, direction)
    xyz = _xyz_grid(geometry, shape)
    hu = np.full(shape, LUNG_HU, dtype=np.float64)
    if wall_x is not None:
        hu[xyz[..., 0] >= wall_x] = WALL_HU
    distances = []
    for center, radius, value in spheres:
        d = np.linalg.norm(xyz - np.asarray(center), axis=-1)
        hu[d <= radius] = value
        distances.append(d)
    hu += np.random.default_rng(seed).normal(0, noise, shape)
    ct = Ct(np.clip(np.rint(hu), -1000, 1000).astype(np.int16), geometry, UID)
    return ct, distances


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _ann(center, diameter) -> Annotation:
    return Annotation(UID, tuple(float(v) for v in center), float(diameter))


CENTER = (2.0, -1.0, -80.0)


def test_dense_sphere_in_lung_gives_the_sphere():
    ct, (d,) = _scene(spheres=[(CENTER, 6.0, NODULE_HU)])
    mask = nodule_mask(ct, [_ann(CENTER, 12.0)])
    assert mask.shape == ct.hu.shape and mask.dtype == bool
    assert _dice(mask, d <= 6.0) > 0.97


def test_juxta_pleural_nodule_does_not_bleed_into_the_wall():
    # The nodule touches the wall at x = 8 mm; the wall fills the volume beyond it.
    ct, (d,) = _scene(spheres=[(CENTER, 6.0, NODULE_HU)], wall_x=CENTER[0] + 6.0)
    wall = _xyz_grid(ct.geometry, ct.hu.shape)[..., 0] >= CENTER[0] + 6.0
    nodule = d <= 6.0
    assert np.count_nonzero(wall) > 10 * np.count_nonzero(nodule)  # the wall is big and connected
    for margin in (1.0, 1.2):
        mask = nodule_mask(ct, [_ann(CENTER, 12.0)], margin=margin)
        assert d[mask].max() <= 6.0 * margin  # nothing beyond the bounding sphere
        assert np.count_nonzero(mask & wall) < 0.25 * np.count_nonzero(nodule)
    assert _dice(nodule_mask(ct, [_ann(CENTER, 12.0)]), nodule) > 0.95


def test_vessel_entering_the_sphere_without_touching_the_nodule_is_dropped():
    ct, (d,) = _scene(spheres=[(CENTER, 4.0, NODULE_HU)])
    hu = ct.hu.copy()
    xyz = _xyz_grid(ct.geometry, hu.shape)
    # A vessel along z, 6.5 mm from the centre: inside the 1.8x sphere, 1.5 mm from the nodule.
    vessel = np.hypot(xyz[..., 0] - (CENTER[0] + 6.5), xyz[..., 1] - CENTER[1]) <= 1.0
    hu[vessel] = NODULE_HU
    ct = Ct(hu, ct.geometry, UID)
    mask = nodule_mask(ct, [_ann(CENTER, 8.0)], margin=1.8)
    assert not (mask & vessel).any()
    assert _dice(mask, d <= 4.0) > 0.95


def test_two_nodules():
    a, b = (-8.0, -6.0, -85.0), (9.0, 8.0, -75.0)
    ct, (da, db) = _scene(spheres=[(a, 5.0, NODULE_HU), (b, 3.0, NODULE_HU)])
    anns = [_ann(a, 10.0), _ann(b, 6.0)]
    mask = nodule_mask(ct, anns)
    assert _dice(mask, (da <= 5.0) | (db <= 3.0)) > 0.95
    scan = build_scan_mask(ct, anns)
    assert _dice(scan.nodule(0), da <= 5.0) > 0.95
    assert _dice(scan.nodule(1), db <= 3.0) > 0.9
    np.testing.assert_array_equal(scan.mask, mask)
    for k, dist, r in ((0, da, 5.0), (1, db, 3.0)):
        where = np.nonzero(scan.nodule(k))
        expected = [int(w.min()) for w in where] + [int(w.max()) + 1 for w in where]
        assert scan.boxes_irc[k].tolist() == expected
        assert scan.voxel_counts[k] == np.count_nonzero(scan.nodule(k))
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    np.testing.assert_array_equal(scan.positive_slices, slices)
    for i in (0, int(slices[0]), int(slices[-1])):
        np.testing.assert_array_equal(scan.slice_mask(i), mask[i])


def test_overlapping_nodules_keep_their_own_voxels_and_round_trip():
    a, b = (-3.0, -1.0, -80.0), (4.0, -1.0, -80.0)
    ct, (da, db) = _scene(spheres=[(a, 5.0, NODULE_HU), (b, 5.0, NODULE_HU)])
    far = ct.geometry.irc_to_xyz([-5, 0, 0])
    scan = build_scan_mask(ct, [_ann(a, 10.0), _ann(far, 6.0), _ann(b, 10.0)])
    first, second = scan.nodule(0), scan.nodule(2)
    assert (first & second).any()  # both keep the shared voxels
    assert _dice(first | second, (da <= 5.0) | (db <= 5.0)) > 0.95
    np.testing.assert_array_equal(scan.mask, first | second)
    assert not scan.nodule(1).any() and scan.voxel_counts[1] == 0
    again = ScanMask.from_array(scan.series_uid, scan.to_array())
    np.testing.assert_array_equal(again.boxes_irc, scan.boxes_irc)
    for k in range(3):
        np.testing.assert_array_equal(again.nodule(k), scan.nodule(k))


def test_ground_glass_nodule_gets_its_own_threshold():
    ct, (d,) = _scene(spheres=[(CENTER, 6.0, -600)], noise=25.0)
    mask = nodule_mask(ct, [_ann(CENTER, 12.0)])
    assert _dice(mask, d <= 6.0) > 0.9
    # With the solid threshold only, a ground-glass nodule would shrink to its centre voxel.
    solid_only = nodule_mask(ct, [_ann(CENTER, 12.0)], min_threshold_hu=-400)
    assert np.count_nonzero(solid_only) < 0.05 * np.count_nonzero(d <= 6.0)


def test_part_solid_nodule_keeps_its_halo():
    ct, (d, _) = _scene(spheres=[(CENTER, 6.0, -600), (CENTER, 2.5, NODULE_HU)], noise=25.0)
    mask = nodule_mask(ct, [_ann(CENTER, 12.0)])
    assert _dice(mask, d <= 6.0) > 0.9


def test_cavity_at_the_centre_falls_back_to_sphere_and_threshold():
    ct, (outer, inner) = _scene(spheres=[(CENTER, 6.0, NODULE_HU), (CENTER, 3.0, -1000)], noise=5.0)
    mask = nodule_mask(ct, [_ann(CENTER, 12.0)])
    shell = (outer <= 6.0) & (inner > 3.0)
    assert _dice(mask, shell) > 0.9
    assert mask[tuple(ct.geometry.xyz_to_irc_int(CENTER))]  # the centre voxel is always in


def test_nodule_at_the_volume_edge_is_cut_not_shifted():
    shape = (20, 48, 48)
    edge = _scene(shape=shape)[0].geometry.irc_to_xyz([0, 24, 24])  # centre on the first slice
    ct, (d,) = _scene(shape=shape, spheres=[(edge, 5.0, NODULE_HU)])
    mask = nodule_mask(ct, [_ann(edge, 10.0)])
    assert _dice(mask, d <= 5.0) > 0.95
    assert mask[0].any() and not mask[6:].any()


def test_annotations_outside_or_without_diameter_are_skipped(caplog):
    ct, (d,) = _scene(spheres=[(CENTER, 5.0, NODULE_HU)])
    far = ct.geometry.irc_to_xyz([-3, 10, 10])
    with caplog.at_level(logging.WARNING, logger="luna.masks"):
        scan = build_scan_mask(ct, [_ann(far, 10.0), _ann(CENTER, 10.0), _ann(CENTER, 0.0)])
    assert "2 of 3 annotations" in caplog.text
    assert scan.boxes_irc[0].tolist() == [-1] * 6 and scan.voxel_counts[0] == 0
    assert scan.boxes_irc[2].tolist() == [-1] * 6
    assert _dice(scan.mask, d <= 5.0) > 0.95
    assert not nodule_mask(ct, [_ann(far, 10.0)]).any()


def test_empty_annotation_list_gives_an_empty_mask():
    ct, _ = _scene()
    mask = nodule_mask(ct, [])
    assert mask.shape == ct.hu.shape and not mask.any()
    scan = build_scan_mask(ct, [])
    assert scan.bits.size == 0 and len(scan.positive_slices) == 0 and not scan.mask.any()
    assert scan.slice_mask(3).shape == (48, 48) and not scan.slice_mask(3).any()


def test_annotation_of_another_series_is_refused():
    ct, _ = _scene()
    with pytest.raises(ValueError, match="series"):
        nodule_mask(ct, [Annotation("other", CENTER, 10.0)])


@pytest.mark.parametrize(
    "spacing, direction",
    [
        ((0.7, 0.7, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
        ((0.7, 0.7, 2.5), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),  # LUNA16's flipped scans
        ((0.8, 1.1, 1.6), tuple(np.array([[math.cos(0.5), -math.sin(0.5), 0],
                                          [math.sin(0.5), math.cos(0.5), 0],
                                          [0, 0, 1]]).ravel())),  # oblique
    ],
)
def test_mask_is_measured_in_mm_not_voxels(spacing, direction):
    shape = (16, 64, 64)
    geometry = Geometry((0, 0, 0), spacing, direction)
    center = geometry.irc_to_xyz([8.2, 31.6, 32.3])
    d = np.linalg.norm(_xyz_grid(geometry, shape) - center, axis=-1)
    ct = Ct(np.where(d <= 7.0, NODULE_HU, LUNG_HU).astype(np.int16), geometry, UID)
    mask = nodule_mask(ct, [_ann(center, 14.0)])
    assert d[mask].max() <= 7.0
    assert _dice(mask, d <= 7.0) > 0.98
    volume = np.count_nonzero(mask) * np.prod(spacing)
    assert volume == pytest.approx(4 / 3 * math.pi * 7.0**3, rel=0.1)


# ------------------------------------------------------------------------ cache


@pytest.fixture
def scan_dir(tmp_path):
    ct, _ = _scene(spheres=[(CENTER, 5.0, NODULE_HU), ((-10.0, 10.0, -90.0), 3.0, NODULE_HU)])
    write_scan(tmp_path / "data" / "subset0" / f"{UID}.mhd", ct.hu, ct.geometry)
    return DataDir.open(tmp_path / "data")


def test_cache_hit_returns_the_same_mask_and_changes_miss(scan_dir, tmp_path, monkeypatch):
    cache = ArrayCache(tmp_path / "cache")
    anns = [_ann(CENTER, 10.0), _ann((-10.0, 10.0, -90.0), 6.0), Annotation("elsewhere", CENTER, 8.0)]
    source = MaskSource(scan_dir, cache, anns)
    built = source.get(UID)
    assert len(cache) == 1
    expected = nodule_mask(read_image(scan_dir.scan_path(UID)), anns[:2])
    np.testing.assert_array_equal(built.mask, expected)

    loads = []
    real_load = luna.masks.load_ct
    monkeypatch.setattr(luna.masks, "load_ct", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    hit = MaskSource(scan_dir, cache, anns).get(UID)
    assert loads == []
    np.testing.assert_array_equal(hit.mask, built.mask)
    np.testing.assert_array_equal(hit.boxes_irc, built.boxes_irc)
    np.testing.assert_array_equal(hit.positive_slices, built.positive_slices)
    np.testing.assert_array_equal(hit.voxel_counts, built.voxel_counts)
    assert hit.shape_irc == built.shape_irc

    moved = [_ann((CENTER[0] + 1, CENTER[1], CENTER[2]), 10.0), anns[1]]
    MaskSource(scan_dir, cache, moved).get(UID)
    assert len(loads) == 1 and len(cache) == 2
    MaskSource(scan_dir, cache, anns, MaskParams(margin=1.2)).get(UID)
    assert len(loads) == 2 and len(cache) == 3
    assert MaskSource(scan_dir, cache, anns).key(UID) != MaskSource(scan_dir, cache, moved).key(UID)
    # A changed scan file (here: a new modification time) is a new scan.
    raw = scan_dir.scan_path(UID).with_suffix(".raw")
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    MaskSource(scan_dir, cache, anns).get(UID)
    assert len(loads) == 3 and len(cache) == 4


def test_cached_mask_is_small(scan_dir, tmp_path):
    scan = MaskSource(scan_dir, None, [_ann(CENTER, 10.0)]).get(UID)
    stored = len(encode_array(scan.to_array()))
    assert stored < 500 < scan.mask.size // 100


def test_mask_params_are_checked():
    with pytest.raises(ValueError):
        MaskParams(margin=0)
    with pytest.raises(ValueError):
        MaskParams(threshold_hu=-800, min_threshold_hu=-700)
    assert MaskParams().key != MaskParams(threshold_hu=-350).key


# --------------------------------------------------------------- synthetic scans


def test_synthetic_dataset_masks_cover_each_nodule(tiny_dataset, tmp_path):
    data = DataDir.open(tiny_dataset)
    annotations = load_annotations(tiny_dataset)
    source = MaskSource(data, ArrayCache(tmp_path / "cache"), annotations)
    with open(tiny_dataset / "ground_truth.csv", newline="") as f:
        truth = [r for r in csv.DictReader(f) if r["kind"] == "nodule" and r["excluded"] == "False"]
    assert len(truth) == len(annotations) > 0
    masks = {uid: source.get(uid) for uid in data.series_uids}
    ratios = []
    for row in truth:
        scan = masks[row["seriesuid"]]
        spacing = read_image(data.scan_path(row["seriesuid"])).geometry.spacing_xyz
        center_irc = tuple(int(math.floor(float(row[k]) + 0.5)) for k in ("index", "row", "col"))
        assert scan.mask[center_irc], row
        diameter = float(row["diameter_mm"])
        uid_annotations = source.annotations(row["seriesuid"])
        k = next(i for i, a in enumerate(uid_annotations) if a.diameter_mm == pytest.approx(diameter))
        volume = scan.voxel_counts[k] * float(np.prod(spacing))
        ratios.append(volume / (4 / 3 * math.pi * (diameter / 2) ** 3))
    # Measured 0.81 .. 0.98 (tiny preset, seed 0); a factor of 2 either way is the bound asked for.
    assert 0.5 < min(ratios) and max(ratios) < 2.0, ratios


def test_synthetic_masks_match_the_generators_nodule_voxels():
    """Dice against the voxels the generator drew as nodule (before blur and noise)."""
    from luna.synth.anatomy import Tissue
    from luna.synth.presets import PRESETS
    from luna.synth.scan import FLIPPED, ScanSpec, make_scan

    dices = []
    for seed, index, direction in ((3, 0, None), (3, 1, FLIPPED), (4, 2, None), (4, 3, FLIPPED)):
        preset = PRESETS["tiny"]
        spec = ScanSpec(index, f"s{index}", subset=0, preset=preset, seed=seed, direction=direction)
        scan = make_scan(spec, keep_labels=True)
        ct = Ct(scan.hu, scan.geometry, spec.series_uid)
        drawn = scan.info["labels"] == Tissue.NODULE
        xyz = _xyz_grid(ct.geometry, ct.hu.shape)
        for finding in scan.findings:
            if finding.excluded:
                continue
            radius = finding.diameter_mm / 2
            annotation = Annotation(spec.series_uid, tuple(finding.center_xyz), finding.diameter_mm)
            mask = nodule_mask(ct, [annotation])
            near = np.linalg.norm(xyz - finding.center_xyz, axis=-1) <= 1.8 * radius
            dices.append(_dice(mask, drawn & near))
    # Generator 5, these four scans' 10 nodules (solid, juxta-pleural/-vascular, part-solid,
    # ground glass): mean 0.89, worst 0.67; on 44 tiny nodules (seeds 3-6, 4 scans each) mean 0.92, worst 0.67 (a
    # 3.9 mm juxta-vascular one: at this size a voxel more or less is a tenth of the Dice).
    # While tuning (generator 3), on 28 tiny and 71 demo nodules: mean 0.95 / 0.94, worst
    # 0.78 / 0.75 (luna/masks.py).
    assert len(dices) >= 6
    assert np.mean(dices) > 0.85 and min(dices) > 0.6, dices
