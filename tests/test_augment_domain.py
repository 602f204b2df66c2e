"""Domain augmentation (resolution, intensity, texture): what differs between scanners, in 3D and 2D."""

import pytest
import torch

from luna.data.augment import AUGMENT_DEFAULTS, Augment3d, AugmentParams, apply_domain, ct_noise
from luna.data.augment2d import Augment2d
from luna.training.app import build_parser
from luna.training.config import AUGMENTATIONS, TrainingConfig

SHAPE = (8, 48, 48)


def params(n, **domain):
    base = AugmentParams.identity(n)
    return AugmentParams(base.flip, base.angle, base.scale, base.offset, **domain)


def tensor(values):
    return torch.as_tensor(values, dtype=torch.float64)


def body(n=2):
    """Air around a block of soft tissue (40 HU) with a bright core: edges to blur and sharpen."""
    x = torch.full((n, 1, *SHAPE), -1000.0)
    x[:, :, :, 12:36, 12:36] = 40.0
    x[:, :, :, 20:28, 20:28] = 400.0
    return x


def test_intensity_keeps_air_and_moves_tissue_by_gain_and_offset():
    x = body()
    out = apply_domain(x, x, params(2, gain=tensor([1.05, 0.95]), shift=tensor([10.0, -20.0])))
    assert out is not x
    assert torch.allclose(out[:, :, :, 0, 0], torch.tensor([-990.0, -1020.0])[:, None, None])
    tissue = out[:, 0, 0, 16, 16]
    assert torch.allclose(tissue, torch.tensor([-1000 + 1.05 * 1040 + 10, -1000 + 0.95 * 1040 - 20]))
    # drawn within the switch's range: gain 1 +- 0.05, offset +- 20 HU
    p = Augment3d(intensity=0.05, seed=0).sample(256, SHAPE)
    assert p.gain.min() >= 0.95 and p.gain.max() <= 1.05 and p.gain.std() > 0.02
    assert p.shift.abs().max() <= 20.0 and p.shift.std() > 8


def test_texture_is_correlated_noise_of_the_drawn_size():
    peak = tensor([0.1, 0.3])
    noise = ct_noise((2, 1, 16, 64, 64), peak, seed=3)
    assert noise.std(dim=(1, 2, 3, 4)) == pytest.approx(torch.ones(2), abs=0.06)
    assert noise.mean().abs() < 0.05
    # A low peak frequency: neighbours correlate strongly; a high one: little.
    def lag1(a):
        return torch.corrcoef(torch.stack([a[..., :-1].reshape(-1), a[..., 1:].reshape(-1)]))[0, 1]
    assert lag1(noise[0]) > 0.6 and lag1(noise[1]) < 0.3
    # Each slice its own draw; the same seed the same noise.
    assert lag1(noise[0].transpose(-1, -3)) < 0.1
    assert torch.equal(noise, ct_noise((2, 1, 16, 64, 64), peak, seed=3))
    x = torch.zeros(2, 1, *SHAPE)
    out = apply_domain(x, x, params(2, texture_sigma=tensor([0.0, 20.0]), texture_peak=tensor([0.2, 0.2]),
                                    texture_seed=1))
    assert torch.equal(out[0], x[0]) and out[1].std() == pytest.approx(20.0, rel=0.1)


def test_resolution_blurs_or_sharpens_and_leaves_flat_regions_alone():
    x = body(3)
    out = apply_domain(x, x, params(3, blur=tensor([1.0, 0.0, 0.0]), sharpen=tensor([0.0, 0.8, 0.0])))
    edge = x[:, 0, 0, 24, 8:16]
    # blurred: the step from air to tissue spreads; sharpened: it overshoots both levels
    assert (out[0, 0, 0, 24, 8:16] - edge).abs().max() > 100
    assert out[1, 0, 0, 24, 8:16].min() < -1010 and out[1, 0, 0, 24, 8:20].max() > 50
    assert torch.equal(out[2], x[2])
    # away from edges, and at the chunk's border (replicated), nothing changes
    assert torch.allclose(out[:, :, :, 0:6, 0:6], x[:, :, :, 0:6, 0:6], atol=1e-3)
    assert torch.allclose(out[:, :, :, 15, 15], x[:, :, :, 15, 15], atol=1.0)
    p = Augment3d(resolution=1.0, seed=0).sample(400, SHAPE)
    assert ((p.blur > 0) ^ (p.sharpen > 0)).float().mean() > 0.99
    assert 0.4 < (p.blur > 0).float().mean() < 0.6 and p.blur.max() <= 1.0 and p.sharpen.max() <= 1.0


def test_domain_switches_do_not_change_the_geometric_draws_or_the_white_noise():
    x = body(3)
    geometric = dict(flip=True, offset=0.1, scale=0.2, rotate=180, noise=25.0)
    _, plain = Augment3d(**geometric, seed=4)(x, return_params=True)
    out, domain = Augment3d(**geometric, intensity=0.05, texture=20.0, resolution=1.0, seed=4)(x, return_params=True)
    for name in ("flip", "angle", "scale", "offset"):
        assert torch.equal(getattr(plain, name), getattr(domain, name))
    assert plain.noise_seed == domain.noise_seed and plain.gain is None and domain.gain is not None
    # replaying the parameters replays everything
    assert torch.equal(Augment3d(**geometric, intensity=0.05, texture=20.0, resolution=1.0).apply(x, domain), out)
    # label maps (noise=False) only move
    labels = (x > 0).float()
    moved = Augment3d(**geometric, fill=0).apply(labels, domain, mode="nearest", noise=False)
    assert set(moved.unique().tolist()) <= {0.0, 1.0}


def test_2d_image_gets_the_domain_augmentations_and_the_label_does_not():
    image = body(2)[:, :, 0:3, :, :].reshape(2, 3, 48, 48)
    label = image[:, :1] > 0
    aug = Augment2d(intensity=0.05, texture=20.0, resolution=1.0, seed=2)
    assert not aug.is_geometric and not aug.is_identity
    out, out_label = aug(image, label)
    assert torch.equal(out_label, label)
    assert not torch.equal(out, image)
    # every context slice (channel) gets its own texture
    noise = Augment2d(texture=20.0, seed=5)(torch.zeros(4, 3, 48, 48))
    assert (noise[:, 0] - noise[:, 1]).abs().max() > 1
    assert 0 < noise.std() < 20


def test_the_random_stream_is_pinned():
    """The third batch of seed 7, pinned: a draw added to the module's stream would change every later
    batch of every augmenter, and no earlier run would reproduce (a new kind must draw from a stream of
    its own). A calibre augmentation once did that, and the 10-epoch run no longer trained the same UNet."""
    aug = Augment3d(flip=True, rotate=180.0, intensity=0.05, texture=20.0, resolution=1.0, seed=7)
    for _ in range(3):
        p = aug.sample(4, SHAPE)
    assert p.angle.tolist() == pytest.approx([7.018122785435592, 65.26613989275602, 117.86263935648375,
                                              32.72000820157075], abs=1e-9)
    assert (p.noise_seed, p.texture_seed) == (1173624014212035815, 561505406514273770)


def test_switches_defaults_and_checks():
    aug = Augment3d.from_switches(intensity=True, texture=True, resolution=True)
    assert (aug.intensity, aug.texture, aug.resolution) == (AUGMENT_DEFAULTS["intensity"], AUGMENT_DEFAULTS["texture"],
                                                            AUGMENT_DEFAULTS["resolution"])
    assert not aug.is_geometric and not aug.is_identity
    assert Augment2d.from_switches(texture=True).texture == 20.0
    for bad in [dict(intensity=0.5), dict(intensity=-0.1), dict(texture=-1), dict(resolution=4)]:
        with pytest.raises(ValueError):
            Augment3d(**bad)


def test_training_flags_turn_the_domain_kinds_on():
    config = TrainingConfig.from_args(build_parser().parse_args(["--no-augment", "--augment-texture",
                                                                 "--augment-resolution"]))
    switches = config.loop.augmentation.switches()
    assert switches["texture"] and switches["resolution"] and not switches["intensity"] and not switches["flip"]
    every = TrainingConfig.from_args(build_parser().parse_args(["--augment"])).loop.augmentation.switches()
    assert set(every) == set(AUGMENTATIONS) and all(every.values())
    default = TrainingConfig.from_args(build_parser().parse_args([])).loop.augmentation.switches()
    assert default == every  # augmentation is on unless --no-augment
    aug = Augment3d.from_switches(**every)
    assert aug.is_geometric and aug.is_domain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_domain_augmentation_matches_cpu_where_it_draws_nothing_on_the_device():
    x = body(3)
    p = params(3, blur=tensor([1.0, 0.0, 0.0]), sharpen=tensor([0.0, 0.8, 0.0]), gain=tensor([1.05, 0.95, 1.0]),
               shift=tensor([10.0, -20.0, 0.0]))
    cpu = apply_domain(x, x, p)
    gpu = apply_domain(x.cuda(), x.cuda(), p)
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-2)
    noise = ct_noise((2, 1, 8, 48, 48), tensor([0.1, 0.3]), seed=1, device="cuda")
    assert noise.is_cuda and noise.std().item() == pytest.approx(1.0, abs=0.1)
