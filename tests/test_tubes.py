"""Tube distractors (`luna.data.tubes`): what a tube looks like, and that a label stays true."""

import torch
import pytest

from luna.data.tubes import CLEAR_SPACING_MM, TRAVERSE_SPACING_MM, TubeDistractors

SHAPE = (1, 32, 48, 48)
AIR = -900.0


def air(n: int) -> torch.Tensor:
    return torch.full((n, *SHAPE), AIR)


def test_a_negative_gets_a_straight_tube_through_its_centre():
    tubes = TubeDistractors(1.0, seed=0)
    n = 16
    out, p = tubes(air(n), torch.zeros(n, dtype=torch.long), torch.zeros(n), return_params=True)
    assert bool(p["drawn"].all())
    for i in range(n):
        dense = (out[i, 0] > AIR + 1).nonzero().double()
        assert len(dense) > 0
        # the axis passes within one radius of the centre, so the centre is on the tube
        assert float(p["distance"][i]) <= float(p["radius"][i])
        assert float(out[i, 0, 15:17, 23:25, 23:25].max()) > AIR + 0.5 * (float(p["hu"][i]) - AIR)
        # a tube, not a blob: the dense voxels stretch along the axis far beyond the radius
        scaled = dense * torch.tensor([float(p["anisotropy"][i]), 1.0, 1.0], dtype=torch.float64)
        centred = scaled - scaled.mean(0)
        spread = torch.linalg.eigvalsh(centred.T @ centred / len(dense))
        assert float(spread[-1].sqrt()) > 2.5 * float(spread[0].sqrt()), i
        # the tube's density on its axis, nothing beyond its radius + 1/2 (one voxel of partial volume)
        assert float(out[i].max()) == pytest.approx(float(p["hu"][i]), abs=1e-3)
        rel = scaled - torch.tensor([15.5, 23.5, 23.5], dtype=torch.float64) * scaled.new_tensor(
            [float(p["anisotropy"][i]), 1.0, 1.0]) - p["offset"][i]
        u = p["direction"][i]
        along = rel @ u
        if bool(p["end"][i]):  # a tube that ends near the centre, with a round end no wider than itself
            along = along.clamp_min(0.0)
        off_axis = (rel - along[:, None] * u).norm(dim=1)
        assert float(off_axis.max()) <= float(p["radius"][i]) + 0.5 + 1e-4
    assert 0 < int(p["end"].sum()) < n  # half of them end there, half run through


def test_a_tube_beside_a_nodule_keeps_clear_of_it_and_a_tube_through_it_is_thin():
    tubes = TubeDistractors(1.0, seed=1)
    n = 64
    diameter = torch.linspace(4.0, 30.0, n)
    nodule = air(n)
    d, h, w = torch.meshgrid(*(torch.arange(s) - (s - 1) / 2 for s in SHAPE[1:]), indexing="ij")
    radius_vox = diameter / 2 / 0.7  # a 0.7 mm scan
    for i in range(n):
        inside = (d * 2.0) ** 2 + h ** 2 + w ** 2 <= float(radius_vox[i]) ** 2
        nodule[i, 0][inside] = 40.0
    out, p = tubes(nodule, torch.ones(n, dtype=torch.long), diameter, return_params=True)
    through = p["distance"] < diameter / 2 / CLEAR_SPACING_MM
    assert 0 < int(through.sum()) < n
    # through: thin beside the nodule (at most a quarter of its smallest size in voxels), near its centre
    assert bool((p["radius"][through] <= torch.clamp(diameter[through] / 4 / TRAVERSE_SPACING_MM, min=1.0)).all())
    assert bool((p["distance"][through] <= 0.3 * diameter[through] / 2 / TRAVERSE_SPACING_MM).all())
    # beside: the axis stays a nodule radius (at 0.5 mm pixels) plus the tube's own radius away
    beside = ~through
    assert bool((p["distance"][beside] >= diameter[beside] / 2 / CLEAR_SPACING_MM + p["radius"][beside]).all())
    for i in torch.nonzero(beside).flatten().tolist():
        inside = (d * float(p["anisotropy"][i])) ** 2 + h ** 2 + w ** 2 <= float(radius_vox[i]) ** 2
        assert torch.equal(out[i, 0][inside], nodule[i, 0][inside]), i
    # the nodule is never made less dense
    assert bool((out >= nodule).all())


def test_what_is_left_alone():
    tubes = TubeDistractors(1.0, seed=2)
    x = air(3)
    x[:, :, 10:20, 10:20, 10:20] = 300.0  # bone: denser than any tube
    before = x.clone()
    labels = torch.tensor([1, 1, 0])
    out, p = tubes(x, labels, torch.tensor([float("nan"), 0.0, 0.0]), return_params=True)
    assert torch.equal(x, before)  # the input is never written
    assert p["drawn"].tolist() == [False, False, True]  # positives of unknown size keep their chunk
    assert torch.equal(out[:2], x[:2])
    assert bool((out[2][x[2] == 300.0] == 300.0).all())  # a tube only raises a voxel towards its density
    assert TubeDistractors(0.0, seed=2)(x, labels, torch.zeros(3)) is x


def test_the_same_seed_draws_the_same_tubes():
    x, labels, diameter = air(8), torch.tensor([0, 1] * 4), torch.full((8,), 12.0)
    a = TubeDistractors(0.5, seed=3)(x, labels, diameter)
    b = TubeDistractors(0.5, seed=3)(x, labels, diameter)
    c = TubeDistractors(0.5, seed=4)(x, labels, diameter)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [{"share": 1.5}, {"share": -0.1}, {"radius": (0.2, 3.0)}, {"radius": (4.0, 2.0)},
                                    {"hu": (80.0, -40.0)}, {"ends": 2.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        TubeDistractors(**kwargs)
