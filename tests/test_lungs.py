"""luna.inference.lungs: the HU lung mask, and the detections it keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from luna.ct import Ct
from luna.geometry import Geometry
from luna.inference.lungs import keep_near_lungs, lung_mask, near_lungs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LIDC_0001 = SHARED / "lidc-idri" / "LIDC-IDRI-0001"
LIDC_NODULE_XYZ = (56.208, 86.343, -115.868)


def _chest(shape=(12, 64, 64)) -> Ct:
    """Room air around a soft-tissue body holding two air-filled lungs (and a dense nodule on a wall)."""
    hu = np.full(shape, -1000, np.int16)
    rows, cols = np.mgrid[: shape[1], : shape[2]]
    body = ((rows - 32) / 26) ** 2 + ((cols - 32) / 29) ** 2 <= 1
    hu[:, body] = 40
    for c in (18, 46):
        lung = ((rows - 32) / 16) ** 2 + ((cols - c) / 9) ** 2 <= 1
        hu[:, lung] = -850
    hu[:, 30:34, 17:19] = 30  # a vessel in the left lung: a hole that the fill closes
    return Ct(hu, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 2.0)), "chest")


def test_lungs_are_the_enclosed_air_not_the_room():
    ct = _chest()
    lungs = lung_mask(ct)
    full = lungs.full_resolution()
    assert full[:, 32, 18].all() and full[:, 32, 46].all()  # both lungs, every slice
    assert not full[:, 2, 2].any()  # room air
    assert not full[:, 32, 32].any()  # mediastinum
    assert full[6, 31, 17]  # the vessel inside the lung is filled in
    box = lungs.box((0, 2, 2))
    assert box[1].start <= 16 and box[1].stop >= 48 and box[2].start <= 9 and box[2].stop >= 55


def test_detections_far_from_the_lungs_are_dropped():
    ct = _chest()
    lungs = lung_mask(ct)

    class D:
        def __init__(self, xyz):
            self.center_xyz = xyz

    inside, wall, far = D((18.0, 32.0, 10.0)), D((6.0, 32.0, 10.0)), D((32.0, 58.0, 10.0))
    assert near_lungs(lungs, ct, [d.center_xyz for d in (inside, wall, far)], 5.0).tolist() == [True, True, False]
    kept, dropped = keep_near_lungs([inside, wall, far], ct, 5.0)
    assert kept == [inside, wall] and dropped == 1
    assert keep_near_lungs([far], ct, None) == ([far], 0)


def test_no_lungs_rules_nothing_out():
    ct = Ct(np.full((4, 32, 32), 40, np.int16), Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "block")
    lungs = lung_mask(ct)
    assert lungs.empty and lungs.box() is None
    assert near_lungs(lungs, ct, [(5.0, 5.0, 1.0)], 1.0).tolist() == [True]


def test_real_lidc_slab_keeps_its_juxta_pleural_nodule():
    if not LIDC_0001.is_dir():
        pytest.skip("shared data not present")
    from luna.io import load_ct

    ct = load_ct(LIDC_0001)
    lungs = lung_mask(ct)
    assert 0.08 < lungs.full_resolution().mean() < 0.35
    assert near_lungs(lungs, ct, [LIDC_NODULE_XYZ], 15.0).tolist() == [True]
    # a point in the body wall far from the lungs (the sternum's front, outside the ribs) is not
    irc = np.array(ct.geometry.xyz_to_irc(LIDC_NODULE_XYZ))
    front = ct.geometry.irc_to_xyz([irc[0], 40.0, 256.0])
    assert near_lungs(lungs, ct, [front], 15.0).tolist() == [False]


@pytest.mark.parametrize("source", ["lidc-0001", "lidc-0002", "phantom"])
def test_lung_field_inference_equals_whole_slices_near_the_lungs(source, tiny_dataset):
    """The UNet on the lungs' box gives the whole-slice probabilities wherever a detection may be kept."""
    import torch

    from luna.inference.lungs import segmentation_region
    from luna.inference.pipeline import LUNG_MARGIN_MM
    from luna.inference.segment import receptive_radius, segment_ct
    from luna.io import load_ct
    from luna.models import SegmentationUNet

    if source == "phantom":
        from luna.datadir import DataDir

        data = DataDir.open(tiny_dataset)
        ct = load_ct(data.scan_path(data.series_uids[0]))
    else:
        folder = SHARED / "lidc-idri" / ("LIDC-IDRI-0001" if source == "lidc-0001" else "LIDC-IDRI-0002")
        if not folder.is_dir():
            pytest.skip("shared data not present")
        ct = load_ct(folder)
    torch.manual_seed(0)
    model = SegmentationUNet().eval()
    lungs = lung_mask(ct)
    region = segmentation_region(lungs, ct, LUNG_MARGIN_MM, receptive_radius(model))
    assert region is not None
    whole = segment_ct(model, ct, dtype=np.float32)
    cropped = segment_ct(model, ct, dtype=np.float32, region=region)
    # every voxel a kept detection can be centred on: lung within the margin
    irc = np.argwhere(np.ones(ct.hu.shape[1:], bool))[::7]
    for index in range(0, ct.hu.shape[0], max(ct.hu.shape[0] // 4, 1)):
        points = np.c_[np.full(len(irc), index), irc].astype(float)
        near = near_lungs(lungs, ct, ct.geometry.irc_to_xyz(points), LUNG_MARGIN_MM)
        r, c = irc[near].T
        assert np.abs(whole[index, r, c] - cropped[index, r, c]).max() <= 1e-5
    share = np.prod([s.stop - s.start for s in region]) / np.prod(ct.hu.shape)
    assert share < 1.0 or source == "phantom"


def test_no_annotated_nodule_lies_away_from_the_lungs(tiny_dataset):
    """Juxta-pleural ones included: every nodule of the synthetic set is kept by the lung rule."""
    from luna.annotations import load_annotations
    from luna.datadir import DataDir
    from luna.inference.pipeline import LUNG_MARGIN_MM
    from luna.io import load_ct

    data = DataDir.open(tiny_dataset)
    annotations = load_annotations(data.root)
    assert annotations
    for uid in data.series_uids:
        centers = [a.center_xyz for a in annotations if a.series_uid == uid]
        if centers:
            ct = load_ct(data.scan_path(uid))
            assert near_lungs(lung_mask(ct), ct, centers, LUNG_MARGIN_MM).all(), uid
