"""Geometry: exact round trips and agreement with SimpleITK on every kind of direction."""

import numpy as np
import pytest
import SimpleITK as sitk

from luna.geometry import Geometry


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


DIRECTIONS = {
    "identity": np.eye(3),
    "luna16-flipped": np.diag([-1.0, -1.0, 1.0]),
    "oblique": _rotation([0.3, -0.5, 0.8], 23.0),
    "oblique-flipped": _rotation([1.0, 2.0, 0.5], -71.0) @ np.diag([1.0, -1.0, 1.0]),
}


@pytest.fixture(params=sorted(DIRECTIONS))
def geometry(request):
    return Geometry(
        origin_xyz=(-191.3, 12.5, -342.75),
        spacing_xyz=(0.703125, 0.703125, 2.5),
        direction=DIRECTIONS[request.param].ravel(),
    )


def _sitk_image(geometry, size_cri=(64, 64, 32)):
    image = sitk.Image(list(size_cri), sitk.sitkInt16)
    geometry.apply_to_sitk(image)
    return image


def test_round_trip_both_ways(geometry):
    rng = np.random.default_rng(0)
    irc = rng.uniform(-10, 600, size=(1000, 3))
    xyz = rng.uniform(-400, 400, size=(1000, 3))
    np.testing.assert_allclose(geometry.xyz_to_irc(geometry.irc_to_xyz(irc)), irc, atol=1e-9)
    np.testing.assert_allclose(geometry.irc_to_xyz(geometry.xyz_to_irc(xyz)), xyz, atol=1e-9)


def test_agrees_with_simpleitk(geometry):
    image = _sitk_image(geometry)
    rng = np.random.default_rng(1)
    for irc in rng.uniform(-5, 70, size=(50, 3)):
        expected_xyz = image.TransformContinuousIndexToPhysicalPoint(tuple(irc[::-1]))
        np.testing.assert_allclose(geometry.irc_to_xyz(irc), expected_xyz, atol=1e-6)
    for xyz in geometry.irc_to_xyz(rng.uniform(0, 60, size=(50, 3))):
        expected_cri = image.TransformPhysicalPointToContinuousIndex(tuple(xyz))
        # 1e-6 mm: compare the positions the two indices stand for, in mm.
        got = geometry.irc_to_xyz(geometry.xyz_to_irc(xyz))
        want = geometry.irc_to_xyz(np.array(expected_cri)[::-1])
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(geometry.xyz_to_irc(xyz), np.array(expected_cri)[::-1], atol=1e-6)


def test_vectorised_over_leading_shape(geometry):
    irc = np.arange(2 * 5 * 3, dtype=float).reshape(2, 5, 3)
    xyz = geometry.irc_to_xyz(irc)
    assert xyz.shape == (2, 5, 3)
    np.testing.assert_allclose(xyz[1, 2], geometry.irc_to_xyz(irc[1, 2]))


def test_returns_floats_and_rounding_is_explicit():
    g = Geometry((0, 0, 0), (1, 1, 1))
    assert g.xyz_to_irc((0.4, 0.6, 2.5)).dtype == np.float64
    np.testing.assert_allclose(g.xyz_to_irc((0.4, 0.6, 2.5)), (2.5, 0.6, 0.4))
    assert g.xyz_to_irc_int((0.4, 0.6, 1.6)).tolist() == [2, 1, 0]


def test_axis_order_is_index_row_col():
    # x runs along columns, y along rows, z along the slice index.
    g = Geometry((10.0, 20.0, 30.0), (0.5, 0.7, 2.0))
    np.testing.assert_allclose(g.irc_to_xyz((1, 0, 0)), (10.0, 20.0, 32.0))
    np.testing.assert_allclose(g.irc_to_xyz((0, 1, 0)), (10.0, 20.7, 30.0))
    np.testing.assert_allclose(g.irc_to_xyz((0, 0, 1)), (10.5, 20.0, 30.0))
    assert g.spacing_irc == (2.0, 0.7, 0.5)


def test_is_hashable_and_comparable():
    a = Geometry((1, 2, 3), (1, 1, 2), np.eye(3).ravel())
    b = Geometry([1.0, 2.0, 3.0], np.array([1, 1, 2]), tuple(np.eye(3).ravel()))
    assert a == b and hash(a) == hash(b)


def test_rejects_bad_values():
    with pytest.raises(ValueError):
        Geometry((0, 0), (1, 1, 1))
    with pytest.raises(ValueError):
        Geometry((0, 0, 0), (1, 0, 1))
    with pytest.raises(ValueError):
        Geometry((0, 0, 0), (1, 1, 1), np.zeros(9))
