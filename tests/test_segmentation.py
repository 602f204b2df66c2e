"""Full-CT segmentation: batches equal slice-by-slice inference, geometry kept on save."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from luna.ct import Ct
from luna.geometry import Geometry
from luna.inference.segment import context_slices, segment_ct
from luna.io.image import save_volume_image
from luna.models import SegmentationUNet

GEOMETRY = Geometry((-120.0, -100.0, -300.0), (0.7, 0.7, 2.5), np.diag([-1.0, -1.0, 1.0]).ravel())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SegmentationUNet(depth=2, wf=2).eval()


def _ct(shape):
    rng = np.random.default_rng(0)
    return Ct(rng.integers(-1000, 1000, size=shape).astype(np.int16), GEOMETRY, "1.2.3")


def test_context_slices_repeat_the_ends():
    volume = np.arange(5)[:, None, None] * np.ones((5, 2, 2))
    assert context_slices(volume, 0, 3)[:, 0, 0].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert context_slices(volume, 4, 3)[:, 0, 0].tolist() == [1, 2, 3, 4, 4, 4, 4]
    assert context_slices(volume, 2, 1)[:, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("shape, batch", [((9, 16, 16), 4), ((5, 18, 14), 8)])
def test_batched_volume_equals_slice_by_slice(model, shape, batch):
    ct = _ct(shape)
    got = segment_ct(model, ct, batch_size=batch)
    assert got.shape == shape and got.dtype == np.float32  # the default: float16 cannot tell 0.9990 from 0.9995
    half = segment_ct(model, ct, batch_size=batch, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, got, rtol=1e-3, atol=1e-6)
    for index in range(shape[0]):
        x = torch.from_numpy(context_slices(ct.hu, index, 3).astype(np.float32))[None]
        pad_h, pad_w = -shape[1] % 2, -shape[2] % 2
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=-1000)
        with torch.no_grad():
            want = model(x)[0, 0, : shape[1], : shape[2]].numpy()
        np.testing.assert_allclose(got[index], want, atol=1e-5)


def test_saved_image_lines_up_with_the_ct(model, tmp_path):
    ct = _ct((6, 16, 16))
    probabilities = segment_ct(model, ct)
    for name in ["seg.mha", "seg.nii.gz"]:
        path = save_volume_image(probabilities, ct, tmp_path / name)
        image = sitk.ReadImage(str(path))
        np.testing.assert_allclose(image.GetOrigin(), GEOMETRY.origin_xyz, atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), GEOMETRY.direction, atol=1e-6)
        np.testing.assert_allclose(sitk.GetArrayFromImage(image), probabilities, atol=1e-6)
    mask = save_volume_image(probabilities, ct, tmp_path / "mask.mha", threshold=0.5)
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(mask))))) <= {0, 1}
    assert not list(tmp_path.glob(".*partial*"))
