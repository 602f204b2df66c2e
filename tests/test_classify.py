"""Test-time flips in `luna.inference.classify.classify_chunks`: which views, and that they are averaged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from luna.ct import Ct
from luna.errors import LunaError
from luna.geometry import Geometry
from luna.inference.classify import DEFAULT_VIEWS, FLIP_VIEWS, check_views, classify_chunks


class LeftHeavy(nn.Module):
    """p(positive) = sigmoid((mean HU of the first half of the axis - mean of the second half) / 100).

    Mirroring that axis turns z into -z, and sigmoid(z) + sigmoid(-z) = 1."""

    chunk_shape = (32, 48, 48)

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        first, second = chunks.float().chunk(2, dim=self.dim)
        z = (first.mean(dim=(1, 2, 3, 4)) - second.mean(dim=(1, 2, 3, 4))) / 100
        return torch.stack([torch.zeros_like(z), z], dim=1)


def ramp_ct() -> Ct:
    """HU rising along every axis, so that each half of a chunk differs from the other."""
    i, r, c = np.meshgrid(np.arange(40), np.arange(64), np.arange(64), indexing="ij")
    hu = (-1000 + 10 * i + 5 * r + 3 * c).astype(np.int16)
    return Ct(hu, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), "ramp")


def flipped_in(views: int) -> np.ndarray:
    """How many of the first ``views`` views flip each chunk axis (D, H, W)."""
    return np.array([[axis in dims for axis in (2, 3, 4)] for dims in FLIP_VIEWS[:views]]).sum(axis=0)


def test_the_views_are_every_mirror_image_and_balanced():
    assert len(set(FLIP_VIEWS)) == 8 and FLIP_VIEWS[0] == () and DEFAULT_VIEWS in (2, 4, 8)
    assert set(FLIP_VIEWS) == {tuple(d for d, on in zip((2, 3, 4), bits) if on)
                               for bits in np.ndindex(2, 2, 2)}
    for views in (2, 4, 8):  # each axis flipped in half of the views
        assert np.all(flipped_in(views) * 2 == views), (views, flipped_in(views))


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_the_probabilities_of_the_views_are_averaged(dim):
    ct, centres = ramp_ct(), [(31.5, 31.5, 19.5), (30.0, 28.0, 22.0)]
    model = LeftHeavy(dim)
    once = classify_chunks(model, ct, centres, views=1)
    half = 16 if dim == 2 else 24
    for got, centre in zip(once, centres):
        chunk = ct.crop(centre, model.chunk_shape).astype(np.float64)
        first, second = np.split(chunk, [half], axis=dim - 2)
        z = (first.mean() - second.mean()) / 100
        assert got == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-5)
        assert abs(z) > 0.5  # far from 0.5: the average below is not the answer by accident
    # this axis is flipped in half of the 2, 4 and 8 views: z and -z average to exactly 1/2
    for views in (2, 4, 8):
        assert classify_chunks(model, ct, centres, views=views) == pytest.approx([0.5, 0.5], abs=1e-6)
    # 3 views: the unflipped one and two others, one of which flips this axis
    flips = flipped_in(3)[dim - 2]
    expected = [((3 - flips) * p + flips * (1 - p)) / 3 for p in once]
    assert classify_chunks(model, ct, centres, views=3) == pytest.approx(expected, rel=1e-5)


def test_the_screen_gives_the_other_views_only_to_what_one_view_does_not_rule_out():
    """Below ``screen_below`` a chunk keeps its unflipped probability; from it on, the full mean, to the bit."""
    i, r, c = np.meshgrid(np.arange(40), np.arange(64), np.arange(64), indexing="ij")
    hu = (-1000 + 10 * i + 5 * r + c * c // 4).astype(np.int16)  # steeper along x the larger x: p depends on x
    ct = Ct(hu, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), "bowl")
    model = LeftHeavy(4)
    centres = [(x, 31.5, 19.5) for x in (20.0, 28.0, 36.0, 44.0)]
    once = classify_chunks(model, ct, centres, views=1)
    full = classify_chunks(model, ct, centres, views=4)
    floor = float(np.median(once))  # half of them pass
    screened = classify_chunks(model, ct, centres, views=4, screen_below=floor)
    passed = once >= floor
    assert 0 < passed.sum() < len(centres)
    assert np.array_equal(screened[passed], full[passed]) and np.array_equal(screened[~passed], once[~passed])
    assert not np.allclose(full, once)  # the views change the answer: the screen's choice shows
    # counted forward passes: every chunk once, then 3 more views for each chunk that passed
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    classify_chunks(model, ct, centres, views=4, screen_below=floor, batch_size=1)
    assert len(calls) == len(centres) + 3 * int(passed.sum())
    assert np.array_equal(classify_chunks(model, ct, centres, views=1, screen_below=floor), once)


@pytest.mark.parametrize("views", [0, 9, -1, 2.0, True, None])
def test_a_view_count_outside_1_to_8_is_refused(views):
    with pytest.raises(LunaError, match="--views"):
        check_views(views)
