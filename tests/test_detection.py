"""Grouping the segmentation's probabilities into candidate nodules (luna.detection)."""

import math
import time

import numpy as np
import pytest
from scipy import ndimage

from luna.ct import Ct
from luna.geometry import Geometry
from luna.inference.grouping import Detection, _open_in_plane, add_faint, group_detections, search_threshold

# LUNA16-like: fine in-plane, thick slices, and the flipped direction some scans have.
SPACING_XYZ = (0.7, 0.7, 2.5)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
VOXEL_MM3 = 0.7 * 0.7 * 2.5


def make_ct(shape, direction=FLIPPED, hu=None) -> Ct:
    geometry = Geometry((-120.0, 80.0, -300.0), SPACING_XYZ, direction)
    if hu is None:
        hu = np.full(shape, -850, dtype=np.int16)
    return Ct(hu=hu, geometry=geometry, series_uid="1.2.3")


def ellipsoid(shape, center_irc, radius_mm) -> np.ndarray:
    """Voxels whose centres lie within ``radius_mm`` of ``center_irc`` (in mm, anisotropic)."""
    grid = np.indices(shape, dtype=np.float64)
    spacing_irc = SPACING_XYZ[::-1]
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center_irc, spacing_irc))
    return dist2 <= radius_mm**2


def opened(mask: np.ndarray) -> np.ndarray:
    """What the default cleaning should leave: an in-plane opening by a 3x3 cross."""
    cross = ndimage.generate_binary_structure(2, 1)[None]
    return ndimage.binary_opening(mask, cross)


def test_one_sphere_centre_size_and_geometry():
    shape = (24, 64, 64)
    center = (11.3, 30.6, 33.2)
    radius = 5.0
    ball = ellipsoid(shape, center, radius)
    probabilities = np.where(ball, 0.9, 0.05).astype(np.float32)
    ct = make_ct(shape)

    [det] = group_detections(probabilities, ct)

    assert isinstance(det, Detection)
    # The opening trims the pixels that stick out of the digital discs near the poles.
    kept = opened(ball)
    assert 0.9 * ball.sum() < kept.sum() < ball.sum()
    assert det.voxels == kept.sum()
    assert det.center_irc == pytest.approx(tuple(np.argwhere(kept).mean(axis=0)))
    assert np.all(np.abs(np.array(det.center_irc) - center) < 0.5)
    # xyz through the flipped geometry, within half a voxel of the true centre.
    true_xyz = ct.geometry.irc_to_xyz(center)
    assert np.all(np.abs(np.array(det.center_xyz) - true_xyz) < np.array(SPACING_XYZ) / 2)
    assert det.center_xyz[0] < ct.geometry.origin_xyz[0]  # x runs backwards (diag(-1,-1,1))
    assert det.diameter_mm == pytest.approx(2 * radius, rel=0.15)
    assert det.volume_mm3 == pytest.approx(det.voxels * VOXEL_MM3)
    assert det.diameter_mm == pytest.approx((6 * det.volume_mm3 / math.pi) ** (1 / 3))
    assert det.max_probability == pytest.approx(0.9)
    assert det.mean_probability == pytest.approx(0.9)
    where = np.argwhere(kept)
    assert det.bbox_irc == (*where.min(axis=0), *(where.max(axis=0) + 1))
    assert all(isinstance(v, int) for v in det.bbox_irc)


def test_volume_uses_direction_determinant():
    # After gantry tilt the direction matrix is not orthonormal: the voxel is sheared.
    shape = (16, 40, 40)
    ball = ellipsoid(shape, (8, 20, 20), 5.0)
    tilted = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.9)
    [det] = group_detections(ball.astype(np.float32), make_ct(shape, direction=tilted))
    assert det.volume_mm3 == pytest.approx(det.voxels * VOXEL_MM3 * 0.9)


def two_blobs_with_bridge(shape):
    a = ellipsoid(shape, (8, 20, 16), 4.0)
    b = ellipsoid(shape, (8, 20, 44), 4.0)
    bridge = np.zeros(shape, dtype=bool)
    bridge[8, 20, 16:45] = True  # one voxel thick, in-plane
    return a, b, a | b | bridge


def test_thin_neck_is_cut_by_the_opening():
    shape = (16, 40, 60)
    a, b, mask = two_blobs_with_bridge(shape)
    probabilities = mask.astype(np.float32)
    ct = make_ct(shape)

    parted = group_detections(probabilities, ct, opening_radius=1)
    assert len(parted) == 2
    cols = sorted(d.center_irc[2] for d in parted)
    assert cols == pytest.approx([16, 44], abs=0.5)
    # Each is its blob, give or take a voxel of the neck's stub where it meets the blob.
    for det, blob in zip(sorted(parted, key=lambda d: d.center_irc[2]), (a, b)):
        assert abs(det.voxels - opened(blob).sum()) <= 2

    [joined] = group_detections(probabilities, ct, opening_radius=0)
    assert joined.voxels == mask.sum()
    assert joined.center_irc[2] == pytest.approx(30, abs=0.5)


def test_broad_contact_is_not_split():
    # Documented limit: an opening cannot separate blobs touching over a broad face.
    shape = (16, 40, 60)
    mask = ellipsoid(shape, (8, 20, 24), 5.0) | ellipsoid(shape, (8, 20, 34), 5.0)
    assert len(group_detections(mask.astype(np.float32), make_ct(shape))) == 1


def test_separate_blobs_sorted_by_max_probability():
    shape = (20, 48, 80)
    low = ellipsoid(shape, (6, 24, 15), 4.0)
    high = ellipsoid(shape, (13, 24, 60), 3.5)
    probabilities = np.zeros(shape, dtype=np.float32)
    probabilities[low] = 0.7
    probabilities[high] = 0.8
    probabilities[6, 24, 15] = 0.75  # low's max is still below high's
    dets = group_detections(probabilities, make_ct(shape))
    assert len(dets) == 2
    assert [d.max_probability for d in dets] == pytest.approx([0.8, 0.75])
    assert dets[0].center_irc == pytest.approx((13, 24, 60), abs=0.5)
    assert dets[1].center_irc == pytest.approx((6, 24, 15), abs=0.5)
    assert 0.7 < dets[1].mean_probability < 0.75


def test_same_detections_wherever_the_blobs_lie_in_the_volume():
    """Grouping works inside the foreground's bounding box: coordinates must come back whole."""
    shape = (20, 48, 80)
    probabilities = np.zeros(shape, dtype=np.float32)
    probabilities[ellipsoid(shape, (6, 24, 15), 4.0)] = 0.7
    probabilities[ellipsoid(shape, (13, 24, 60), 3.5)] = 0.8
    shift = (5, 7, 3)
    bigger = np.zeros(tuple(n + 2 * d for n, d in zip(shape, shift)), dtype=np.float32)
    bigger[tuple(slice(d, d + n) for n, d in zip(shape, shift))] = probabilities
    small, large = group_detections(probabilities, make_ct(shape)), group_detections(bigger, make_ct(bigger.shape))
    assert len(small) == len(large) == 2
    for a, b in zip(small, large):
        assert b.voxels == a.voxels and b.max_probability == a.max_probability
        assert np.array(b.center_irc) == pytest.approx(np.array(a.center_irc) + shift)
        assert np.array(b.bbox_irc) == pytest.approx(np.array(a.bbox_irc) + np.array(shift * 2))
    kept = opened(ellipsoid(shape, (13, 24, 60), 3.5))
    where = np.argwhere(kept)
    assert small[0].bbox_irc == (*where.min(axis=0), *(where.max(axis=0) + 1))


def test_blob_cut_by_the_volume_edge():
    shape = (16, 40, 40)
    ball = ellipsoid(shape, (8, 20, 1.0), 5.0)  # centre one voxel from column 0
    [det] = group_detections(ball.astype(np.float32), make_ct(shape))
    kept = opened(ball)
    assert kept[:, :, 0].sum() > 0.8 * ball[:, :, 0].sum()  # the border face survives the opening
    assert det.voxels == kept.sum()
    assert det.bbox_irc[2] == 0 and det.bbox_irc[5] <= shape[2]
    assert all(0 <= c <= n - 1 for c, n in zip(det.center_irc, shape))
    assert det.center_irc[2] == pytest.approx(np.argwhere(kept)[:, 2].mean())

    # Cut by the last slice too: the bbox ends at the volume's end.
    corner = ellipsoid(shape, (15, 39, 39), 6.0)
    [det] = group_detections(corner.astype(np.float32), make_ct(shape))
    assert det.bbox_irc[3:] == shape


@pytest.mark.parametrize("fill", [0.0, 0.3, 0.5])
def test_empty_or_below_threshold_gives_nothing(fill):
    shape = (8, 16, 16)
    probabilities = np.full(shape, fill, dtype=np.float32)  # 0.5 is not > 0.5
    assert group_detections(probabilities, make_ct(shape)) == []


def test_speck_and_slab_are_dropped_by_size():
    shape = (20, 64, 64)
    probabilities = np.zeros(shape, dtype=np.float32)
    probabilities[2, 5, 5] = 0.9  # a one-voxel speck: 1.3 mm
    probabilities[10:20, :, :] = 0.9  # a slab: 10 x 64 x 64 voxels, ~46 mm
    nodule = ellipsoid(shape, (4, 40, 40), 4.0)
    probabilities[nodule] = 0.6
    ct = make_ct(shape)

    # Without the opening the speck survives to the size filter and is dropped there.
    dets = group_detections(probabilities, ct, opening_radius=0)
    assert [d.voxels for d in dets] == [nodule.sum()]
    # With looser limits all three come back.
    assert len(group_detections(probabilities, ct, opening_radius=0, min_diameter_mm=0, max_diameter_mm=1e3)) == 3


def test_a_nodule_core_the_opening_erases_is_kept():
    """A small nodule whose core alone is above the threshold: a few voxels no 3x3 disc fits in. The opening
    erases it entirely, so it is kept as it was; a vessel's stub that the opening cuts off a kept blob is not."""
    shape = (12, 48, 48)
    probabilities = np.zeros(shape, dtype=np.float32)
    core = [(5, 10, 10), (5, 10, 11), (5, 11, 10), (6, 10, 10)]  # 4 voxels: 4.9 mm3, a 2.1 mm sphere
    for irc in core:
        probabilities[irc] = 0.999
    ball = ellipsoid(shape, (6, 30, 30), 4.0)
    probabilities[ball] = 0.999
    probabilities[6, 30, 36:44] = 0.999  # a one-voxel-wide stub off the ball: cut by the opening
    ct = make_ct(shape)

    dets = group_detections(probabilities, ct, threshold=0.99)
    assert len(dets) == 2
    speck = min(dets, key=lambda d: d.voxels)
    assert speck.voxels == 4
    assert speck.center_irc == pytest.approx(tuple(np.mean(core, axis=0)))
    assert speck.diameter_mm == pytest.approx((6 * 4 * VOXEL_MM3 / math.pi) ** (1 / 3))
    assert max(dets, key=lambda d: d.voxels).voxels == opened(ball | (probabilities > 0.99)).sum()
    # without keep_erased only the opened ball is left
    assert [d.voxels for d in group_detections(probabilities, ct, threshold=0.99, keep_erased=False)] == [
        max(d.voxels for d in dets)]


def test_hu_weighted_centre_is_pulled_towards_dense_half():
    shape = (16, 40, 40)
    ball = ellipsoid(shape, (8, 20, 20), 6.0)
    hu = np.full(shape, -850, dtype=np.int16)
    hu[ball] = -600
    dense = ball.copy()
    dense[:, :, :20] = False
    hu[dense] = 100  # the right half is solid
    ct = make_ct(shape, hu=hu)
    [det] = group_detections(ball.astype(np.float32), ct)
    kept = np.argwhere(opened(ball))
    plain = kept.mean(axis=0)
    assert det.center_irc[2] > plain[2] + 1.0
    assert det.center_irc[:2] == pytest.approx(tuple(plain[:2]))
    # Weights are HU + 1000: 1100 on the solid half, 400 on the rest.
    cols = kept[:, 2]
    weights = np.where(cols >= 20, 1100.0, 400.0)
    assert det.center_irc[2] == pytest.approx((weights * cols).sum() / weights.sum())


def test_air_only_component_falls_back_to_plain_centroid():
    shape = (16, 40, 40)
    ball = ellipsoid(shape, (8, 20, 20), 5.0)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[8, 20, 20] = -2000  # below air (hu_range=None): still weight 0, not negative
    [det] = group_detections(ball.astype(np.float32), make_ct(shape, hu=hu))
    assert det.center_irc == pytest.approx(tuple(np.argwhere(opened(ball)).mean(axis=0)))


def test_connectivity_choice():
    shape = (8, 30, 30)
    mask = np.zeros(shape, dtype=bool)
    mask[1:4, 5:12, 5:12] = True
    mask[4:7, 12:19, 12:19] = True  # touches the first only along a corner
    probabilities = mask.astype(np.float32)
    ct = make_ct(shape)
    # No opening here: it would round the corners off and part the cubes.
    assert len(group_detections(probabilities, ct, opening_radius=0, min_diameter_mm=0)) == 1
    assert len(group_detections(probabilities, ct, opening_radius=0, min_diameter_mm=0, connectivity=1)) == 2


def test_validation_errors():
    ct = make_ct((8, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        group_detections(np.zeros((8, 16, 15), np.float32), ct)
    bad = np.zeros((8, 16, 16), np.float32)
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        group_detections(bad, ct)
    with pytest.raises(ValueError):
        group_detections(np.zeros((8, 16, 16), np.float32), ct, connectivity=4)
    with pytest.raises(ValueError):
        group_detections(np.zeros((8, 16, 16), np.float32), ct, min_diameter_mm=5, max_diameter_mm=4)


@pytest.mark.parametrize("radius", [1, 2])
def test_opening_matches_ndimage(radius):
    rng = np.random.default_rng(radius)
    mask = rng.random((4, 33, 29)) > 0.35
    rows, cols = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = (rows**2 + cols**2 <= radius**2)[None]
    np.testing.assert_array_equal(_open_in_plane(mask, radius), ndimage.binary_opening(mask, disc))


def test_full_size_ct_speed():
    """Sanity run on a 128x512x512 volume with 50 blobs and noise; prints the time."""
    shape = (128, 512, 512)
    rng = np.random.default_rng(0)
    probabilities = (rng.random(shape, dtype=np.float32) * 0.55)  # ~9% noise voxels over 0.5
    hu = np.full(shape, -850, dtype=np.int16)
    offsets = np.indices((7, 17, 17)) - np.array([3, 8, 8])[:, None, None, None]
    blob = (offsets[0] / 2.5) ** 2 + (offsets[1] / 7.5) ** 2 + (offsets[2] / 7.5) ** 2 <= 1
    centers = [(i, r, 40 + 48 * ((3 * k + r // 48) % 10))
               for k, i in enumerate(range(8, 128, 24)) for r in range(40, 512, 48)]
    for i, r, c in centers:
        region = (slice(i - 3, i + 4), slice(r - 8, r + 9), slice(c - 8, c + 9))
        probabilities[region][blob] = 0.9
        hu[region][blob] = 40
    ct = make_ct(shape, hu=hu)

    start = time.perf_counter()
    # 2.5 mm: the random noise leaves a few chance blobs of 1.5-2.5 mm after the opening.
    # Salt noise is no segmentation: kept, the blobs it erases would be tens of thousands.
    dets = group_detections(probabilities, ct, min_diameter_mm=2.5, keep_erased=False)
    elapsed = time.perf_counter() - start
    print(f"\ngroup_detections on {shape}: {elapsed:.2f} s, {len(dets)} detections")
    assert len(dets) == 50
    found = sorted(tuple(round(v) for v in d.center_irc) for d in dets)
    assert found == sorted(centers)


def test_search_threshold_divides_the_odds_by_ten():
    assert search_threshold(0.999) == pytest.approx(99.9 / 100.9)  # 0.990
    assert search_threshold(0.5) == pytest.approx(1 / 11)
    assert search_threshold(0.9) < search_threshold(0.99) < search_threshold(0.999) < 0.999
    assert search_threshold(0.0) == 0.0 and search_threshold(1.0) == 1.0  # no odds to divide


def test_faint_blobs_are_added_once_most_probable_first_within_the_budget():
    """What only the search threshold shows is added; a search blob centred on a detection is that detection."""
    shape = (24, 64, 96)
    probabilities = np.zeros(shape, dtype=np.float32)
    probabilities[ellipsoid(shape, (12, 32, 16), 6.0)] = 0.995  # a halo around the bright core below
    probabilities[ellipsoid(shape, (12, 32, 16), 3.0)] = 0.9995
    faint_centres = {0.998: (6, 16, 48), 0.997: (18, 48, 48), 0.993: (12, 32, 80)}
    for p, centre in faint_centres.items():
        probabilities[ellipsoid(shape, centre, 3.0)] = p
    ct = make_ct(shape)
    bright = group_detections(probabilities, ct, threshold=0.999)
    faint = group_detections(probabilities, ct, threshold=search_threshold(0.999))
    assert len(bright) == 1 and len(faint) == 4  # the halo is found again, centred on the core

    def centres(dets):
        return [tuple(np.round(d.center_irc).astype(int)) for d in dets]

    assert centres(add_faint(bright, faint, budget=10)) == [(12, 32, 16), (6, 16, 48), (18, 48, 48), (12, 32, 80)]
    assert centres(add_faint(bright, faint, budget=2)) == [(12, 32, 16), (6, 16, 48), (18, 48, 48)]
    assert add_faint(bright, faint, budget=0) == bright
    assert centres(add_faint([], faint, budget=1)) == [(12, 32, 16)]  # nothing to repeat: the halo is new
