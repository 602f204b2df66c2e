"""Augment2d: each kind does what it says, to the image and its label alike."""

import math

import pytest
import torch

import luna.data.augment2d
from luna.data.augment2d import AUGMENT2D_DEFAULTS, Augment2d, AugmentParams2d

SIZE = (48, 48)
CENTRE = tuple((s - 1) / 2 for s in SIZE)
HU_TOLERANCE = 0.02  # float32 rounding of grid_sample at pixel centres
ALL = dict(flip=True, offset=0.1, scale=0.2, rotate=180, noise=25)


def params(n=1, flip=None, angle=None, scale=None, offset=None, noise_sigma=0.0, noise_seed=0):
    base = AugmentParams2d.identity(n)
    as64 = lambda v, shape: torch.as_tensor(v, dtype=torch.float64).reshape(shape)  # noqa: E731
    return AugmentParams2d(
        flip=base.flip if flip is None else torch.as_tensor(flip, dtype=torch.bool).reshape(n, 2),
        angle=base.angle if angle is None else as64(angle, (n,)),
        scale=base.scale if scale is None else as64(scale, (n,)),
        offset=base.offset if offset is None else as64(offset, (n, 2)),
        noise_sigma=noise_sigma,
        noise_seed=noise_seed,
    )


def square(top=10, left=20, side=6, n=1, channels=3, size=SIZE):
    """Air with a bright square in every channel, and its label."""
    image = torch.full((n, channels, *size), -1000.0)
    image[:, :, top : top + side, left : left + side] = 200.0
    return image, image[:, :1] > 0


def blob(radius=6.0, size=SIZE):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) - c for s, c in zip(size, CENTRE)], indexing="ij")
    inside = torch.sqrt(sum(g**2 for g in grids)) <= radius
    return torch.where(inside, 100.0, -800.0)[None, None], inside[None, None]


def random_pair(n=2, channels=3, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(-1000, 1001, (n, channels, *size), generator=g).float()
    return image, torch.rand(n, 1, *size, generator=g) < 0.3


def centroid(mask):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in mask.shape], indexing="ij")
    weights = mask.double()
    return torch.stack([(g * weights).sum() / weights.sum() for g in grids])


def foreground(image):
    return image[:, :1] > -400  # the bright part of the image, comparable with the label


@pytest.mark.parametrize("k", [(3, 0), (0, -4), (2, 5)])
def test_offset_moves_image_and_label_by_k_pixels(k):
    image, label = square()
    out, out_label = Augment2d(offset=0.2).apply(image, label, params(offset=k))
    expected_image, expected_label = square(10 + k[0], 20 + k[1])
    torch.testing.assert_close(out, expected_image, atol=HU_TOLERANCE, rtol=0)
    assert torch.equal(out_label, expected_label) and out_label.dtype == torch.bool


def test_sub_pixel_offset_moves_both_alike():
    image, label = square(side=8)
    out, out_label = Augment2d(offset=0.1).apply(image, label.float(), params(offset=[0.3, 1.7]))
    moved = centroid(out[0, 0] + 1000) - centroid(image[0, 0] + 1000)
    torch.testing.assert_close(moved, torch.tensor([0.3, 1.7], dtype=torch.float64), atol=1e-3, rtol=0)
    # The label follows to the nearest pixel, as a binary mask: exactly the pixels
    # where the image shows more than half the square's contrast. Bilinear weights
    # at a corner multiply (0.7 x 0.7 < 0.5), so one corner pixel drops out.
    assert set(out_label.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out_label.bool(), foreground(out))
    assert (out_label.bool() ^ square(10, 22, side=8)[1]).sum() == 1


def test_outside_is_air_for_the_image_and_background_for_the_label():
    image = torch.full((1, 1, *SIZE), 500.0)
    label = torch.ones(1, 1, *SIZE, dtype=torch.bool)
    out, out_label = Augment2d(offset=0.2).apply(image, label, params(offset=[0, 4]))
    assert (out[..., :4] == -1000).all() and not out_label[..., :4].any()
    assert out_label[..., 4:].all()
    torch.testing.assert_close(out[..., 5:], image[..., 5:], atol=HU_TOLERANCE, rtol=0)


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
def test_flip_equals_torch_flip_for_image_and_label(axes):
    image, label = random_pair(1)
    out, out_label = Augment2d(flip=True).apply(image, label, params(flip=[a in axes for a in range(2)]))
    dims = [a + 2 for a in axes]
    torch.testing.assert_close(out, torch.flip(image, dims=dims), atol=HU_TOLERANCE, rtol=0)
    assert torch.equal(out_label, torch.flip(label, dims=dims))


def test_random_flips_follow_their_parameters_and_respect_flip_axes():
    image, label = random_pair(12, seed=1)
    out, out_label, p = Augment2d(flip=True, seed=5)(image, label, return_params=True)
    assert p.flip.any() and not p.flip.all()
    for i in range(12):
        dims = [a + 2 for a in range(2) if p.flip[i, a]]
        assert torch.equal(out_label[i : i + 1], torch.flip(label[i : i + 1], dims) if dims else label[i : i + 1])
    _, _, p = Augment2d(flip=True, flip_axes=(1,), seed=5)(image, label, return_params=True)
    assert not p.flip[:, 0].any() and p.flip[:, 1].any()


def test_rotation_by_90_degrees_equals_rot90_for_image_and_label():
    image, label = random_pair(2)
    out, out_label = Augment2d(rotate=90).apply(image, label, params(2, angle=[90, -90]))
    # +90: the col axis turns toward the row axis, (h, w) -> (w, W - 1 - h)
    torch.testing.assert_close(out[:1], torch.rot90(image[:1], 1, dims=(3, 2)), atol=HU_TOLERANCE, rtol=0)
    torch.testing.assert_close(out[1:], torch.rot90(image[1:], 1, dims=(2, 3)), atol=HU_TOLERANCE, rtol=0)
    assert torch.equal(out_label[:1], torch.rot90(label[:1], 1, dims=(3, 2)))
    assert torch.equal(out_label[1:], torch.rot90(label[1:], 1, dims=(2, 3)))


@pytest.mark.parametrize("angle", [30.0, -135.0])
def test_any_angle_turns_image_and_label_about_the_centre(angle):
    image, label = square(8, 30, side=7)
    out, out_label = Augment2d(rotate=180).apply(image, label, params(angle=angle))
    centre = torch.tensor(CENTRE, dtype=torch.float64)
    dh, dw = (centroid(label[0, 0]) - centre).tolist()
    a = math.radians(angle)
    expected = centre + torch.tensor([dh * math.cos(a) + dw * math.sin(a), -dh * math.sin(a) + dw * math.cos(a)], dtype=torch.float64)
    torch.testing.assert_close(centroid(out_label[0, 0]), expected, atol=0.3, rtol=0)
    torch.testing.assert_close(centroid(foreground(out)[0, 0]), expected, atol=0.3, rtol=0)
    assert abs(int(out_label.sum()) - 49) <= 6  # area kept
    # the label covers what the image shows
    assert (foreground(out) ^ out_label).sum() <= 4


@pytest.mark.parametrize("factor", [1.3, 0.8])
def test_scale_changes_the_area_of_image_and_label_by_its_square(factor):
    image, label = blob()
    out, out_label = Augment2d(scale=0.3).apply(image, label, params(scale=factor))
    for before, after in ((image > -350, out > -350), (label, out_label)):
        assert after.sum() / before.sum() == pytest.approx(factor**2, rel=0.1)
        # about the centre: nothing moves
        torch.testing.assert_close(centroid(after[0, 0]), torch.tensor(CENTRE, dtype=torch.float64), atol=1e-3, rtol=0)


def test_noise_changes_the_image_only():
    image, label = random_pair(4)
    out, out_label = Augment2d(noise=25.0, seed=0)(image, label)
    assert (out - image).mean().item() == pytest.approx(0.0, abs=0.5)
    assert (out - image).std().item() == pytest.approx(25.0, rel=0.02)
    assert out_label is label
    # with geometry too: the label is what the geometry alone makes of it
    aug = Augment2d(offset=0.1, rotate=180, noise=25.0, seed=1)
    out, out_label, p = aug(image, label, return_params=True)
    clean, clean_label = aug.apply(image, label, AugmentParams2d(p.flip, p.angle, p.scale, p.offset))
    assert torch.equal(out_label, clean_label)
    assert (out - clean).std().item() == pytest.approx(25.0, rel=0.02)


def test_noise_only_never_resamples(monkeypatch):
    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled without a geometric switch")

    monkeypatch.setattr(luna.data.augment2d.F, "grid_sample", no_resampling)
    image, label = random_pair(2)
    aug = Augment2d(noise=10.0, seed=0)
    assert not aug.is_geometric and not aug.is_identity
    out, out_label = aug(image, label)
    assert out_label is label and (out - image).std().item() == pytest.approx(10.0, rel=0.05)


def test_all_switches_off_is_the_identity(monkeypatch):
    monkeypatch.setattr(luna.data.augment2d.F, "grid_sample", None)
    image, label = random_pair(2)
    aug = Augment2d()
    assert aug.is_identity
    out, out_label = aug(image, label)
    assert out is image and out_label is label
    assert aug(image) is image
    # identity parameters with the geometric switches on: no resampling either
    out, out_label = Augment2d(flip=True, offset=0.1, scale=0.2, rotate=180).apply(image, label, params(2))
    assert out is image and out_label is label


def test_same_seed_same_output_other_seed_other_output():
    image, label = random_pair(3)
    a = Augment2d(**ALL, seed=7)(image, label)
    b = Augment2d(**ALL, seed=7)(image, label)
    c = Augment2d(**ALL, seed=8)(image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    aug = Augment2d(**ALL, seed=7)
    assert not torch.equal(aug(image), aug(image))  # the generator advances
    # switching one kind does not change the others' draws
    _, _, with_noise = Augment2d(offset=0.1, noise=25, seed=4)(image, label, return_params=True)
    _, _, without = Augment2d(offset=0.1, seed=4)(image, label, return_params=True)
    assert torch.equal(with_noise.offset, without.offset)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.uint8])
def test_label_stays_binary_in_its_dtype(dtype):
    image, label = random_pair(4, seed=3)
    out, out_label = Augment2d(**ALL, seed=2)(image, label.to(dtype))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out_label.shape == label.shape and out_label.dtype == dtype
    assert set(out_label.unique().tolist()) <= {0, 1}


def test_batch_samples_get_their_own_parameters():
    image, label = random_pair(4)
    aug = Augment2d(flip=True, offset=0.1, scale=0.2, rotate=180, seed=11)
    out, out_label, p = aug(image, label, return_params=True)
    assert len({tuple(m.flatten().tolist()) for m in p.matrices()}) == 4
    assert (p.offset.abs() <= 0.1 * torch.tensor(SIZE, dtype=torch.float64)).all()
    for i in range(4):
        alone = AugmentParams2d(p.flip[i : i + 1], p.angle[i : i + 1], p.scale[i : i + 1], p.offset[i : i + 1])
        one, one_label = aug.apply(image[i : i + 1], label[i : i + 1], alone)
        torch.testing.assert_close(one, out[i : i + 1], atol=1e-3, rtol=0)
        assert torch.equal(one_label, out_label[i : i + 1])


def test_non_square_images():
    image, label = square(4, 24, side=4, size=(20, 40))
    out, out_label = Augment2d(rotate=90).apply(image, label, params(angle=90))
    # 90 degrees on a 20x40 image keeps pixel distances: centre (9.5, 19.5), the square's
    # centre (5.5, 25.5) is (-4, 6) from it and goes to (6, 4) from it.
    assert out_label.sum() == 16
    expected = torch.tensor([15.5, 23.5], dtype=torch.float64)
    torch.testing.assert_close(centroid(out_label[0, 0]), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(centroid(foreground(out)[0, 0]), expected, atol=1e-3, rtol=0)


def test_bad_inputs_and_defaults():
    image, label = random_pair(2)
    with pytest.raises(ValueError):
        Augment2d()(image[0], label[0])
    with pytest.raises(ValueError, match="does not match"):
        Augment2d()(image, label[:1])
    with pytest.raises(TypeError):
        Augment2d(offset=0.1)(image.to(torch.int16), label)
    for bad in [dict(offset=0.7), dict(scale=1.0), dict(rotate=200), dict(noise=-1), dict(flip_axes=(2,))]:
        with pytest.raises(ValueError):
            Augment2d(**bad)
    aug = Augment2d.from_switches(flip=True, offset=True, scale=True, rotate=True, noise=True)
    d = AUGMENT2D_DEFAULTS
    assert (aug.flip, aug.offset, aug.scale, aug.rotate, aug.noise) == (True, d["offset"], d["scale"], d["rotate"], d["noise"])
    assert Augment2d.from_switches().is_identity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu():
    image, label = random_pair(3)
    cpu = Augment2d(flip=True, offset=0.1, scale=0.2, rotate=180, seed=1)(image, label)
    gpu = Augment2d(flip=True, offset=0.1, scale=0.2, rotate=180, seed=1)(image.cuda(), label.cuda())
    assert gpu[0].is_cuda and gpu[1].is_cuda
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=0.5, rtol=0)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 0.01  # ties at the 0.5 threshold may differ
