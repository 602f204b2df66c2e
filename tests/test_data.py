"""luna.data: batch augmentation, the classification dataset, balanced sampling, split."""

import math
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import luna.data.augment
from conftest import write_scan
from luna.annotations import CandidateInfo, load_candidate_infos
from luna.cache import ArrayCache
from luna.chunks import ChunkSource
from luna.data import (
    Augment3d,
    AugmentParams,
    BalancedSampler,
    ChunkDataset,
    annotated_nodules,
    split_candidates,
    warp,
    worker_init_fn,
)
from luna.datadir import DataDir
from luna.geometry import Geometry

SHAPE = (32, 48, 48)
CENTRE = tuple((s - 1) / 2 for s in SHAPE)  # what rotation and scale turn about
HU_TOLERANCE = 0.02  # float32 rounding of grid_sample at voxel centres


# ------------------------------------------------------------------------- helpers


def params(n=1, flip=None, angle=None, scale=None, offset=None, noise_sigma=0.0, noise_seed=0):
    base = AugmentParams.identity(n)
    as64 = lambda v, shape: torch.as_tensor(v, dtype=torch.float64).reshape(shape)  # noqa: E731
    return AugmentParams(
        flip=base.flip if flip is None else torch.as_tensor(flip, dtype=torch.bool).reshape(n, 3),
        angle=base.angle if angle is None else as64(angle, (n,)),
        scale=base.scale if scale is None else as64(scale, (n,)),
        offset=base.offset if offset is None else as64(offset, (n, 3)),
        noise_sigma=noise_sigma,
        noise_seed=noise_seed,
    )


def point_batch(points, shape=SHAPE, value=1000.0):
    """Air with one bright voxel per sample."""
    x = torch.full((len(points), 1, *shape), -1000.0)
    for i, p in enumerate(points):
        x[(i, 0, *p)] = value
    return x


def peak(volume):
    """(d, h, w) of the brightest voxel of a (D, H, W) tensor."""
    flat = int(torch.argmax(volume))
    return tuple(int(v) for v in np.unravel_index(flat, volume.shape))


def centroid(volume, background=-1000.0):
    weights = (volume - background).clamp_min(0).double()
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in volume.shape], indexing="ij")
    return torch.stack([(g * weights).sum() / weights.sum() for g in grids])


def gaussian(center, shape=SHAPE, sigma=1.5):
    """A smooth bright spot (its sampled centroid is accurate after any resampling)."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    squared = sum((g - c) ** 2 for g, c in zip(grids, center))
    return (-1000.0 + 2000.0 * torch.exp(-squared / (2 * sigma**2)))[None, None]


def blob(shape=SHAPE, radius=5.0):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) - c for s, c in zip(shape, CENTRE)], indexing="ij")
    distance = torch.sqrt(sum(g**2 for g in grids))
    return torch.where(distance <= radius, 100.0, -800.0)[None, None]


def random_hu(n=3, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1000, 1001, (n, 1, *shape), generator=g).float()


# ---------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [3, -2])
def test_offset_moves_a_point_by_k_voxels_along_its_axis(axis, k):
    start = (16, 20, 27)
    offset = [0.0, 0.0, 0.0]
    offset[axis] = k
    out = Augment3d(offset=0.1).apply(point_batch([start]), params(offset=offset))
    expected = list(start)
    expected[axis] += k
    assert peak(out[0, 0]) == tuple(expected)
    assert out.max().item() == pytest.approx(1000.0, abs=HU_TOLERANCE)


def test_sub_voxel_offset_moves_the_centroid():
    out = Augment3d(offset=0.1).apply(point_batch([(16, 20, 27)]), params(offset=[0.5, -0.25, 1.75]))
    torch.testing.assert_close(centroid(out[0, 0]), torch.tensor([16.5, 19.75, 28.75], dtype=torch.float64), atol=1e-3, rtol=0)


def test_random_offsets_reach_the_grid_and_stay_in_range():
    aug = Augment3d(offset=0.1, seed=3)
    start = (16, 24, 24)
    x = point_batch([start] * 8)
    out, p = aug(x, return_params=True)
    assert (p.offset.abs() <= 0.1 * torch.tensor(SHAPE, dtype=torch.float64)).all()
    assert (p.offset.abs() > 0).all()
    for i in range(8):
        moved = centroid(out[i, 0]) - torch.tensor(start, dtype=torch.float64)
        torch.testing.assert_close(moved, p.offset[i], atol=1e-3, rtol=0)


def test_offset_fills_with_air():
    x = torch.full((1, 1, *SHAPE), 500.0)
    out = Augment3d(offset=0.1).apply(x, params(offset=[0, 0, 4]))
    assert (out[..., :4] == -1000).all()
    torch.testing.assert_close(out[..., 5:], x[..., 5:], atol=HU_TOLERANCE, rtol=0)
    border = Augment3d(offset=0.1, fill=None).apply(x, params(offset=[0, 0, 4]))
    torch.testing.assert_close(border, x, atol=HU_TOLERANCE, rtol=0)


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (1, 2), (0, 1, 2)])
def test_flip_mirrors_exactly(axes):
    x = random_hu(1)
    flip = [a in axes for a in range(3)]
    out = Augment3d(flip=True).apply(x, params(flip=flip))
    torch.testing.assert_close(out, torch.flip(x, dims=[a + 2 for a in axes]), atol=HU_TOLERANCE, rtol=0)


def test_random_flips_follow_their_parameters_and_respect_flip_axes():
    x = random_hu(16, seed=1)
    out, p = Augment3d(flip=True, seed=5)(x, return_params=True)
    assert p.flip.any() and not p.flip.all()
    for i in range(16):
        dims = [a + 2 for a in range(3) if p.flip[i, a]]
        expected = torch.flip(x[i : i + 1], dims=dims) if dims else x[i : i + 1]
        torch.testing.assert_close(out[i : i + 1], expected, atol=HU_TOLERANCE, rtol=0)
    _, p = Augment3d(flip=True, flip_axes=(1, 2), seed=5)(x, return_params=True)
    assert not p.flip[:, 0].any() and p.flip[:, 1:].any()


def test_rotation_by_90_degrees_about_the_index_axis():
    d, h, w = 5, 10, 30
    out = Augment3d(rotate=90).apply(point_batch([(d, h, w)]), params(angle=90))
    # (d, h, w) -> (d, w, W - 1 - h): the col axis turns toward the row axis.
    assert peak(out[0, 0]) == (d, w, SHAPE[2] - 1 - h)
    assert out.max().item() == pytest.approx(1000.0, abs=HU_TOLERANCE)
    x = random_hu(2)
    out = Augment3d(rotate=90).apply(x, params(2, angle=[90, -90]))
    torch.testing.assert_close(out[:1], torch.rot90(x[:1], 1, dims=(4, 3)), atol=HU_TOLERANCE, rtol=0)
    torch.testing.assert_close(out[1:], torch.rot90(x[1:], 1, dims=(3, 4)), atol=HU_TOLERANCE, rtol=0)


@pytest.mark.parametrize("angle", [37.0, -120.0])
def test_rotation_keeps_the_index_coordinate_and_the_distance_to_the_axis(angle):
    start = torch.tensor([7.0, 14.0, 30.0], dtype=torch.float64)
    out = Augment3d(rotate=180).apply(gaussian(start.tolist()), params(angle=angle))
    moved = centroid(out[0, 0])
    assert moved[0].item() == pytest.approx(start[0].item(), abs=1e-3)
    centre = torch.tensor(CENTRE, dtype=torch.float64)
    radius = lambda p: torch.linalg.norm((p - centre)[1:]).item()  # noqa: E731
    assert radius(moved) == pytest.approx(radius(start), abs=0.01)
    a = math.radians(angle)
    dh, dw = (start - centre)[1:].tolist()
    expected = torch.tensor([start[0], centre[1] + dh * math.cos(a) + dw * math.sin(a), centre[2] - dh * math.sin(a) + dw * math.cos(a)], dtype=torch.float64)
    torch.testing.assert_close(moved, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("factor", [1.3, 0.8])
def test_scale_enlarges_or_shrinks_a_blob(factor):
    x = blob(radius=5.0)
    before = int((x > -350).sum())
    out = Augment3d(scale=0.3).apply(x, params(scale=factor))
    after = int((out > -350).sum())
    assert after / before == pytest.approx(factor**3, rel=0.15)
    # isotropic about the centre: the blob does not move
    torch.testing.assert_close(centroid(out[0, 0], -800), torch.tensor(CENTRE, dtype=torch.float64), atol=1e-3, rtol=0)


def test_random_scales_change_the_blob_as_drawn():
    x = blob(radius=5.0).repeat(6, 1, 1, 1, 1)
    out, p = Augment3d(scale=0.2, seed=2)(x, return_params=True)
    assert ((p.scale >= 0.8) & (p.scale <= 1.2)).all() and p.scale.std() > 0
    counts = (out > -350).flatten(1).sum(1).double()
    before = float((x[0] > -350).sum())
    torch.testing.assert_close(counts / before, p.scale**3, rtol=0.2, atol=0)


def test_noise_has_the_requested_std_and_zero_mean():
    x = torch.zeros(4, 1, *SHAPE)
    out = Augment3d(noise=25.0, seed=0)(x)
    assert not torch.equal(out, x)
    assert out.mean().item() == pytest.approx(0.0, abs=0.5)
    assert out.std().item() == pytest.approx(25.0, rel=0.01)
    # each sample gets different noise
    assert not torch.equal(out[0], out[1])


def test_noise_is_added_after_resampling():
    x = random_hu(2)
    aug = Augment3d(offset=0.1, noise=25.0, seed=0)
    out, p = aug(x, return_params=True)
    clean = aug.apply(x, AugmentParams(p.flip, p.angle, p.scale, p.offset))
    assert (out - clean).mean().item() == pytest.approx(0.0, abs=0.5)
    assert (out - clean).std().item() == pytest.approx(25.0, rel=0.02)
    assert torch.equal(aug.apply(x, p), out)  # replaying the parameters replays the noise


def test_noise_only_never_resamples(monkeypatch):
    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled without a geometric switch")

    monkeypatch.setattr(luna.data.augment.F, "grid_sample", no_resampling)
    aug = Augment3d(noise=10.0, seed=0)
    assert not aug.is_geometric
    x = random_hu(2)
    out = aug(x)
    assert (out - x).std().item() == pytest.approx(10.0, rel=0.02)


def test_all_switches_off_returns_the_input_exactly(monkeypatch):
    monkeypatch.setattr(luna.data.augment.F, "grid_sample", None)
    x = random_hu(2) + 0.25
    aug = Augment3d()
    assert aug.is_identity
    out = aug(x)
    assert out is x
    out, p = aug(x, return_params=True)
    assert torch.equal(out, x) and torch.equal(p.matrices(), torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    # identity parameters with geometric switches on: no resampling either
    assert torch.equal(Augment3d(flip=True, offset=0.1, scale=0.2, rotate=180).apply(x, params(2)), x)


def test_same_seed_same_output_other_seed_other_output():
    x = random_hu(3)
    kwargs = dict(flip=True, offset=0.1, scale=0.2, rotate=180, noise=25)
    a = Augment3d(**kwargs, seed=7)(x)
    b = Augment3d(**kwargs, seed=7)(x)
    c = Augment3d(**kwargs, seed=8)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the generator advances: the next batch differs from the first
    aug = Augment3d(**kwargs, seed=7)
    assert not torch.equal(aug(x), aug(x))


def test_switching_one_kind_does_not_change_the_others_draws():
    x = random_hu(3)
    _, with_noise = Augment3d(offset=0.1, noise=25, seed=4)(x, return_params=True)
    _, without = Augment3d(offset=0.1, seed=4)(x, return_params=True)
    assert torch.equal(with_noise.offset, without.offset)


def test_batch_samples_get_their_own_parameters():
    x = random_hu(5)
    aug = Augment3d(flip=True, offset=0.1, scale=0.2, rotate=180, seed=11)
    out, p = aug(x, return_params=True)
    assert len({tuple(m.flatten().tolist()) for m in p.matrices()}) == 5
    for i in range(5):
        alone = AugmentParams(p.flip[i : i + 1], p.angle[i : i + 1], p.scale[i : i + 1], p.offset[i : i + 1])
        torch.testing.assert_close(aug.apply(x[i : i + 1], alone), out[i : i + 1], atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_are_preserved(dtype):
    x = random_hu(2, shape=(8, 12, 10)).to(dtype)
    out = Augment3d(flip=True, offset=0.1, scale=0.2, rotate=180, noise=25, seed=0)(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


def test_non_square_rotation_keeps_voxel_distances():
    # 90 degrees on a non-square plane: distances in voxels are kept (no aspect distortion).
    shape = (4, 20, 40)
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
    start = torch.tensor([2.0, 9.5, 25.5], dtype=torch.float64)  # 6 voxels right of the centre
    x = torch.full((1, 1, *shape), -1000.0)
    x[0, 0, 2, 9:11, 25:27] = 1000.0  # a 2x2 patch centred on `start`
    torch.testing.assert_close(centroid(x[0, 0]), start, atol=1e-3, rtol=0)
    out = Augment3d(rotate=90).apply(x, params(angle=90))
    torch.testing.assert_close(centroid(out[0, 0]), torch.tensor([2.0, centre[1] + 6.0, centre[2]], dtype=torch.float64), atol=1e-3, rtol=0)


def test_warp_takes_one_matrix_for_the_batch():
    x = point_batch([(10, 10, 10), (20, 20, 20)])
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    out = warp(x, matrix)
    assert peak(out[0, 0]) == (11, 12, 13) and peak(out[1, 0]) == (21, 22, 23)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        Augment3d()(torch.zeros(1, 32, 48, 48))
    with pytest.raises(TypeError):
        Augment3d(offset=0.1)(torch.zeros(1, 1, 4, 4, 4, dtype=torch.int16))
    for bad in [dict(offset=0.7), dict(scale=1.0), dict(rotate=200), dict(noise=-1), dict(flip_axes=(3,))]:
        with pytest.raises(ValueError):
            Augment3d(**bad)


def test_from_switches_uses_default_magnitudes():
    aug = Augment3d.from_switches(flip=True, offset=True, noise=True)
    assert (aug.flip, aug.offset, aug.scale, aug.rotate, aug.noise) == (True, 0.05, 0.0, 0.0, 25.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu_geometry():
    x = random_hu(3)
    aug_cpu = Augment3d(flip=True, offset=0.1, scale=0.2, rotate=180, seed=1)
    aug_gpu = Augment3d(flip=True, offset=0.1, scale=0.2, rotate=180, seed=1)
    out = aug_gpu(x.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), aug_cpu(x), atol=0.5, rtol=0)
    noisy = Augment3d(noise=25, seed=0)(x.cuda())
    assert noisy.is_cuda and (noisy - x.cuda()).std().item() == pytest.approx(25, rel=0.02)


# --------------------------------------------------------------------------- dataset


def info(uid="1.2.3", x=0.0, nodule=False, annotated=False, malignant=False, diameter=0.0):
    return CandidateInfo(uid, (x, 0.0, 0.0), nodule, annotated, malignant, diameter)


class FakeSource:
    def get(self, series_uid, center_xyz):
        return np.full(SHAPE, int(center_xyz[0]), dtype=np.int16)


def test_labels_for_nodule_and_malignant_modes():
    infos = [
        info(x=0, nodule=True, annotated=True, malignant=True, diameter=8),
        info(x=1, nodule=True, annotated=True, malignant=False, diameter=5),
        info(x=2, nodule=True),  # class-1 candidate without annotation
        info(x=3),
    ]
    nodules = ChunkDataset(infos, FakeSource(), "nodule")
    assert nodules.labels.tolist() == [1, 1, 1, 0]
    chunk, label, index = nodules[2]
    assert chunk.shape == (1, *SHAPE) and chunk.dtype == torch.float32 and chunk[0, 0, 0, 0] == 2
    assert label.dtype == torch.int64 and label.shape == () and label.item() == 1
    assert index.dtype == torch.int64 and index.item() == 2
    assert nodules[np.int64(3)].label.item() == 0

    malignant = ChunkDataset(annotated_nodules(infos), FakeSource(), "malignant")
    assert len(malignant) == 2 and malignant.labels.tolist() == [1, 0]
    assert malignant[0].label.item() == 1 and malignant[1].label.item() == 0
    with pytest.raises(ValueError, match="annotated"):
        ChunkDataset(infos, FakeSource(), "malignant")

    custom = ChunkDataset(infos, FakeSource(), lambda i: i.diameter_mm > 6)
    assert custom.labels.tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError):
        ChunkDataset(infos, FakeSource(), "benign")


def test_split_candidates_by_series():
    uids = [f"1.2.{n}" for n in range(10)]
    infos = [info(uid=u, x=k, nodule=k == 0) for u in uids for k in range(4)]
    train, val = split_candidates(infos, val_stride=3, val_offset=1)
    train_uids, val_uids = {i.series_uid for i in train}, {i.series_uid for i in val}
    assert not train_uids & val_uids
    assert train_uids | val_uids == set(uids)
    assert len(train) + len(val) == len(infos) and len(val_uids) == 3
    assert [i for i in infos if i in val] == val  # order kept


# --------------------------------------------------------------------------- sampler


def labels(n_pos, n_neg, seed=0):
    values = np.array([1] * n_pos + [0] * n_neg)
    return np.random.default_rng(seed).permutation(values)


def test_balanced_epoch_has_the_ratio_and_length():
    y = labels(10, 200)
    for ratio, size in [(1, 40), (3, 40), (2, 99)]:
        sampler = BalancedSampler(y, ratio=ratio, epoch_size=size, seed=0)
        epoch = sampler.epoch_indices(0)
        assert len(sampler) == size == len(epoch) == len(list(sampler))
        positives = int(y[epoch].sum())
        assert positives == round(size / (1 + ratio))
        # no negative twice in an epoch when there are enough
        negatives = epoch[y[epoch] == 0]
        assert len(set(negatives.tolist())) == len(negatives)
    # default epoch: each positive about once
    sampler = BalancedSampler(y, ratio=2)
    assert len(sampler) == 30 and sorted(set(np.flatnonzero(y)) - set(sampler.epoch_indices(0).tolist())) == []


def test_epochs_differ_and_are_reproducible():
    y = labels(10, 200)
    a = BalancedSampler(y, ratio=1, epoch_size=40, seed=1)
    b = BalancedSampler(y, ratio=1, epoch_size=40, seed=1)
    c = BalancedSampler(y, ratio=1, epoch_size=40, seed=2)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    b.set_epoch(1)
    assert list(b) == second
    b.set_epoch(0)
    assert list(b) == first
    c.set_epoch(0)
    assert list(c) != first


def test_negatives_cycle_through_all_over_epochs():
    y = labels(5, 103)
    sampler = BalancedSampler(y, ratio=1, epoch_size=20, seed=0)  # 10 negatives per epoch
    negatives = set(np.flatnonzero(y == 0).tolist())
    seen = set()
    for epoch in range(11):  # ceil(103 / 10) epochs make a cycle
        chosen = sampler.epoch_indices(epoch)
        seen |= set(chosen[y[chosen] == 0].tolist())
        assert len(chosen[y[chosen] == 0]) == len(set(chosen[y[chosen] == 0].tolist()))
    assert seen == negatives
    # positives (fewer than needed) repeat evenly: each 2 times in an epoch
    counts = np.bincount(sampler.epoch_indices(3)[y[sampler.epoch_indices(3)] == 1], minlength=len(y))
    assert sorted(set(counts[np.flatnonzero(y)].tolist())) == [2]


def test_too_few_negatives_repeat_evenly():
    y = labels(20, 3)
    epoch = BalancedSampler(y, ratio=1, epoch_size=20, seed=0).epoch_indices(0)
    counts = np.bincount(epoch[y[epoch] == 0], minlength=len(y))[np.flatnonzero(y == 0)]
    assert sorted(counts.tolist()) == [3, 3, 4]


def test_unbalanced_is_a_shuffle_of_everything():
    y = labels(5, 50)
    sampler = BalancedSampler(y, ratio=0, seed=0)
    assert sorted(list(sampler)) == list(range(55))
    assert list(sampler) != list(range(55))
    assert sorted(BalancedSampler(y, ratio=None).epoch_indices(2).tolist()) == list(range(55))
    # a smaller epoch walks through the dataset, a larger one repeats evenly
    small = BalancedSampler(y, ratio=0, epoch_size=11, seed=0)
    assert sorted(np.concatenate([small.epoch_indices(e) for e in range(5)]).tolist()) == list(range(55))
    big = BalancedSampler(y, ratio=0, epoch_size=110, seed=0).epoch_indices(0)
    assert np.bincount(big).tolist() == [2] * 55


def test_ddp_shares_are_disjoint_equal_and_make_the_epoch():
    y = labels(10, 200)
    for replicas in (2, 3):
        samplers = [BalancedSampler(y, ratio=1, epoch_size=41, seed=5, num_replicas=replicas, rank=r) for r in range(replicas)]
        for s in samplers:
            s.set_epoch(4)
        shares = [list(s) for s in samplers]
        assert len({len(share) for share in shares}) == 1 and len(shares[0]) == len(samplers[0])
        epoch = samplers[0].epoch_indices(4)
        assert len(epoch) == replicas * len(shares[0]) >= 41
        positions = [list(range(r, len(epoch), replicas)) for r in range(replicas)]
        assert sorted(p for ps in positions for p in ps) == list(range(len(epoch)))  # disjoint, complete
        for share, pos in zip(shares, positions):
            assert share == epoch[pos].tolist()
        assert sorted(sum(shares, [])) == sorted(epoch.tolist())
        assert int(y[epoch].sum()) == len(epoch) // 2


def test_sampler_takes_a_dataset_and_refuses_what_cannot_balance():
    dataset = ChunkDataset([info(x=0, nodule=True), info(x=1), info(x=2)], FakeSource())
    assert len(BalancedSampler(dataset, ratio=1)) == 2
    with pytest.raises(ValueError, match="balance"):
        BalancedSampler([0, 0, 0], ratio=1)
    with pytest.raises(ValueError):
        BalancedSampler([0, 1], ratio=1, num_replicas=2, rank=2)


def test_worker_init_fn_seeds_numpy_and_random_from_torch():
    torch.manual_seed(1234)
    worker_init_fn(0)
    a = (np.random.rand(), random.random())
    torch.manual_seed(1234)
    worker_init_fn(0)
    assert (np.random.rand(), random.random()) == a
    torch.manual_seed(1235)
    worker_init_fn(1)
    assert (np.random.rand(), random.random()) != a


# ------------------------------------------------------- dataset on a real data dir

GEOMETRY = Geometry((-100.0, -90.0, -200.0), (0.8, 0.8, 2.0))
UIDS = ["1.2.840.1", "1.2.840.2"]


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "luna"
    (root / "subset0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    candidates = ["seriesuid,coordX,coordY,coordZ,class"]
    annotations = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    malignancy = ["seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool,mal_details"]
    for n, uid in enumerate(UIDS):
        write_scan(root / "subset0" / f"{uid}.mhd", rng.integers(-1200, 1400, size=(30, 50, 50)).astype(np.int16),
                   GEOMETRY)
        for k in range(6):
            x, y, z = GEOMETRY.irc_to_xyz((2 + 5 * k, 5 + 7 * k, 20 + n))
            candidates.append(f"{uid},{x},{y},{z},0")
        x, y, z = GEOMETRY.irc_to_xyz((15, 25, 25))
        annotations.append(f"{uid},{x},{y},{z},6.0")
        malignancy.append(f'{uid},{x},{y},{z},6.0,{n == 0},"[{4 if n == 0 else 2}, 3]"')
    (root / "candidates.csv").write_text("\n".join(candidates) + "\n")
    (root / "annotations.csv").write_text("\n".join(annotations) + "\n")
    (root / "annotations_with_malignancy.csv").write_text("\n".join(malignancy) + "\n")
    return DataDir.open(root)


def test_loader_with_two_workers_serves_the_chunks_of_the_source(data_dir, tmp_path):
    infos = load_candidate_infos(data_dir.root, data_dir.series_uids)
    assert len(infos) == 14 and sum(i.is_nodule for i in infos) == 2
    source = ChunkSource(data_dir, ArrayCache(tmp_path / "cache"))
    dataset = ChunkDataset(infos, source, "nodule")
    sampler = BalancedSampler(dataset, ratio=1, epoch_size=8, seed=0)
    loader = DataLoader(
        dataset, batch_size=3, sampler=sampler, num_workers=2, worker_init_fn=worker_init_fn,
        multiprocessing_context="fork", generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for chunks, batch_labels, indices in loader:
        assert chunks.shape[1:] == (1, *SHAPE) and chunks.dtype == torch.float32
        assert batch_labels.dtype == torch.int64 and indices.dtype == torch.int64
        for chunk, label, index in zip(chunks, batch_labels, indices):
            item = infos[int(index)]
            expected = source.get(item.series_uid, item.center_xyz)
            assert np.array_equal(chunk[0].numpy(), expected.astype(np.float32))
            assert label.item() == int(item.is_nodule)
            assert chunk.min() >= -1000 and chunk.max() <= 1000  # clamped HU
        seen += indices.tolist()
    assert seen == list(sampler)

    train, val = split_candidates(infos, val_stride=2)
    assert {i.series_uid for i in train}.isdisjoint({i.series_uid for i in val}) and train and val

    malignant = ChunkDataset(annotated_nodules(infos), source, "malignant")
    assert sorted(zip([i.series_uid for i in malignant.infos], malignant.labels.tolist())) == [(UIDS[0], 1), (UIDS[1], 0)]
