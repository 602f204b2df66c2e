"""Segmentation training samples: sites on every nodule slice, windows cut right, random crops."""

import numpy as np
import pytest

from luna.annotations import load_annotations
from luna.cache import ArrayCache
from luna.data.segmentation import SegmentationCrops, find_sites
from luna.datadir import DataDir
from luna.io import load_ct
from luna.masks import MaskSource


@pytest.fixture(scope="module")
def scan(tiny_dataset, tmp_path_factory):
    data = DataDir.open(tiny_dataset)
    cache = ArrayCache(tmp_path_factory.mktemp("segcache"))
    masks = MaskSource(data, cache, load_annotations(data.root))
    uid = next(u for u in data.series_uids if masks.annotations(u))
    ct = load_ct(data.scan_path(uid))
    return data, cache, masks, uid, ct


def test_sites_cover_every_nodule_slice_and_negatives_lie_in_the_body(scan):
    data, cache, masks, uid, ct = scan
    scan_masks = masks.get(uid, ct)
    sites = find_sites(ct, scan_masks, negatives=20, rng=np.random.default_rng(0))
    positive = sorted({s.index for s in sites if s.is_positive})
    assert positive == scan_masks.positive_slices.tolist()
    negatives = [s for s in sites if not s.is_positive]
    assert len(negatives) == 20
    assert all(ct.hu[s.index, s.row, s.col] > -950 for s in negatives)


def test_lung_share_of_the_negatives_lies_on_dense_tissue_inside_the_lungs(scan):
    from luna.data.segmentation import DENSE_LUNG_HU
    from luna.inference.lungs import lung_mask

    data, cache, masks, uid, ct = scan
    sites = find_sites(ct, masks.get(uid, ct), negatives=20, rng=np.random.default_rng(0), lung_share=0.5)
    negatives = [s for s in sites if not s.is_positive]
    assert len(negatives) == 20
    lungs = lung_mask(ct).full_resolution()
    on_dense_lung = [bool(lungs[s.index, s.row, s.col]) and ct.hu[s.index, s.row, s.col] > DENSE_LUNG_HU
                     for s in negatives]
    assert on_dense_lung[:10] == [True] * 10  # the lung share comes first
    assert sum(on_dense_lung) < 20  # the rest anywhere in the body


def test_windows_hold_the_context_slices_and_the_mask(scan, tmp_path):
    data, _, masks, uid, ct = scan
    scan_masks = masks.get(uid, ct)
    sites = find_sites(ct, scan_masks, negatives=4, rng=np.random.default_rng(1))
    # a cache of its own: the module's may already hold these windows (prepare_scan
    # cuts them too), and then fill() would rightly cut none
    crops = SegmentationCrops(sites, data, ArrayCache(tmp_path / "cache"), context=3, window=96, crop=64)
    assert crops.fill(uid, masks, ct) == len(sites)
    assert crops.fill(uid, masks, ct) == 0
    site = next(s for s in sites if s.is_positive)
    window = crops.window_of(ct, scan_masks, site)
    assert window.shape == (8, 96, 96)
    # middle channel is the site's slice, centred on the site
    assert window[3, 48, 48] == ct.hu[site.index, site.row, site.col]
    assert window[-1].any() and window[-1].max() == 1
    i = sites.index(site)
    first = crops[i]
    assert first.image.shape == (7, 64, 64) and first.label.shape == (1, 64, 64)
    assert crops[i].image.equal(first.image)  # same epoch, same crop
    moved = False
    for epoch in range(1, 6):
        crops.set_epoch(epoch)
        moved |= not crops[i].image.equal(first.image)
    assert moved  # a new crop position in later epochs


def test_prepared_scan_is_read_from_the_cache_the_second_time(scan, monkeypatch):
    import luna.data.segmentation as segmentation_data
    from luna.data.segmentation import prepare_scan

    data, cache, masks, uid, ct = scan
    first = prepare_scan(uid, data, cache, masks, seed=3)
    assert any(s.is_positive for s in first) and any(not s.is_positive for s in first)

    def no_reads(*args, **kwargs):
        raise AssertionError("read the scan although its sites were cached")

    monkeypatch.setattr(segmentation_data, "load_ct", no_reads)
    assert prepare_scan(uid, data, cache, masks, seed=3) == first
    crops = SegmentationCrops(first, data, cache)
    assert crops[0].image.shape == (7, 64, 64)  # the windows are there too
