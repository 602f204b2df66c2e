"""2D augmentation of segmentation batches (image + label), on whatever device they are on.

The 2D counterpart of `luna.data.augment.Augment3d`, with the same parameter names
and conventions; only what differs is spelled out here. The training loop calls
an `Augment2d` on each batch of ``image`` ``(N, C, H, W)`` float HU (the slice and
its context slices as channels) and ``label`` ``(N, 1, H, W)`` (bool or float 0/1)
after moving them to the device.

Each sample gets one affine map in centred pixel coordinates (h, w), content
moving ``p -> s R F p + t`` (H the row axis, W the col axis), composed of:

1. ``flip``: mirror each axis of ``flip_axes`` (0 row, 1 col) with probability 1/2;
   exactly ``torch.flip`` on that dim.
2. ``rotate``: in-plane, any angle; a positive angle turns the col axis toward the
   row axis: at +90 degrees ``(h, w)`` goes to ``(w, W - 1 - h)`` (square image),
   i.e. ``torch.rot90(x, 1, dims=(3, 2))``.
3. ``scale``: one factor per sample for both axes; ``s > 1`` enlarges the content.
4. ``offset``: translation in pixels (continuous: sub-pixel shifts occur); content
   at ``p`` appears at ``p + t``.
5. ``noise``: Gaussian noise of ``noise`` HU added to the image after resampling,
   never to the label.
6. ``resolution``, ``intensity``, ``texture``: the domain augmentations of
   `luna.data.augment` (blur or sharpening, gain and offset about air, CT-like
   correlated noise), on the image only, after resampling and before ``noise``;
   each context slice (channel) gets its own texture.

Image and label are resampled through the same sampling grid, built once per
batch. The image is interpolated bilinearly and filled with air (``fill``,
-1000 HU) outside; the label is interpolated bilinearly too, filled with 0 (no
nodule) and thresholded at 0.5 (``>= 0.5``). Why not nearest-neighbour: with a
sub-pixel offset, scale or an arbitrary angle, nearest snaps the label to whole
pixels while the image moves by fractions, so the two drift apart by up to half a
pixel; the 0.5 level of the bilinear label is the label's outline moved exactly
as the image is. For flips and multiples of 90 degrees both are exact. The label
comes back binary and in its input dtype (bool stays bool, float is 0.0 / 1.0).

Randomness as in `Augment3d`: per-sample parameters drawn on the CPU from
``generator`` (``seed``), always the same draws in the same order whatever the
switches; noise drawn on the batch's device from a generator seeded by one draw
of it. When no geometric switch is on (or the batch draws only identity maps)
``grid_sample`` is not called, and with every switch off the inputs themselves are
returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from luna.data.augment import ALIGN_CORNERS, AffineParams, RandomAffine, add_noise, apply_domain

__all__ = ["AUGMENT2D_DEFAULTS", "Augment2d", "AugmentParams2d", "sampling_grid"]

AUGMENT2D_DEFAULTS: dict[str, float | bool] = {
    "flip": True,
    "offset": 0.03,  # of the image side: +-1.9 pixels on 64x64 training crops, +-15 on 512x512
    "scale": 0.2,
    "rotate": 180.0,  # any in-plane angle: a nodule has no orientation in the axial plane
    "noise": 25.0,
    "intensity": 0.05,
    "texture": 20.0,
    "resolution": 1.0,
}
"""Magnitudes used when a switch is turned on without one (`Augment2d.from_switches`)."""

LABEL_THRESHOLD = 0.5


@dataclass(frozen=True)
class AugmentParams2d(AffineParams):
    """`AffineParams` of 2D images: axes (row, col); offsets in pixels (h, w)."""

    NDIM: ClassVar[int] = 2

    def matrices(self) -> Tensor:
        """(N, 3, 3) float64: where content moves, in centred pixel coordinates (h, w, 1)."""
        flips = torch.where(self.flip, -1.0, 1.0).to(torch.float64)
        radians = torch.deg2rad(self.angle.to(torch.float64))
        cos, sin = torch.cos(radians), torch.sin(radians)
        # h' = h cos + w sin, w' = -h sin + w cos: +90 degrees takes +w to +h.
        rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        matrix = torch.zeros(len(self), 3, 3, dtype=torch.float64)
        matrix[:, :2, :2] = self.scale.to(torch.float64)[:, None, None] * rotation * flips[:, None, :]
        matrix[:, :2, 2] = self.offset.to(torch.float64)
        matrix[:, 2, 2] = 1.0
        return matrix


def sampling_grid(matrix: Tensor, shape: Sequence[int], *, device=None, dtype=torch.float32) -> Tensor:
    """``F.grid_sample``'s grid (N, H, W, 2) that moves content by ``matrix`` (N, 3, 3).

    ``shape`` is the batch's (N, C, H, W). ``matrix`` maps centred pixel
    coordinates (h, w, 1) of the input to those of the output.
    """
    sizes = [int(s) for s in shape[2:]]
    matrix = matrix.to(device="cpu", dtype=torch.float64)
    # Output pixel -> input pixel, into normalised coordinates (align_corners=False:
    # a pixel is 2 / size wide), then into affine_grid's (x, y) = (w, h) order.
    to_normalised = torch.diag(torch.tensor([2.0 / s for s in sizes] + [1.0], dtype=torch.float64))
    theta = to_normalised @ torch.linalg.inv(matrix) @ torch.linalg.inv(to_normalised)
    reverse = torch.tensor([1, 0, 2])
    theta = theta[:, reverse][:, :, reverse][:, :2, :]
    return F.affine_grid(theta.to(device=device, dtype=dtype), list(shape), align_corners=ALIGN_CORNERS)


class Augment2d(RandomAffine):
    """Random flip / offset / scale / rotate / noise, and resolution / intensity / texture, for (image, label) batches (N, C, H, W).

    A switch is off when its magnitude is 0 (or False):

    - ``flip``: mirror each axis of ``flip_axes`` (0 row, 1 col) with probability 1/2;
    - ``offset``: translation up to ``offset`` x the size of each axis, in pixels, uniform;
    - ``scale``: factor uniform in [1 - scale, 1 + scale];
    - ``rotate``: angle uniform in [-rotate, rotate] degrees (180: any);
    - ``noise``: Gaussian noise with this standard deviation in HU, image only;
    - ``resolution``, ``intensity``, ``texture``: as in `luna.data.augment`, image only.

    ``forward(image, label)`` returns ``(image, label)`` augmented alike (``label``
    may be None: then the image alone); ``return_params=True`` adds the
    `AugmentParams2d`; `apply` replays given parameters.
    """

    AXES = ("row", "col")
    DEFAULTS = AUGMENT2D_DEFAULTS
    Params = AugmentParams2d

    def apply(
        self, image: Tensor, label: Tensor | None, params: AugmentParams2d
    ) -> tuple[Tensor, Tensor | None]:
        """Transform ``image`` and ``label`` (may be None) with given parameters."""
        _check(image, label)
        if len(params) != image.shape[0]:
            raise ValueError(f"{len(params)} sets of parameters for a batch of {image.shape[0]}")
        out_image, out_label = image, label
        matrix = params.matrices()
        if not torch.equal(matrix, torch.eye(3, dtype=torch.float64).expand_as(matrix)):
            grid = sampling_grid(matrix, image.shape, device=image.device, dtype=image.dtype)
            out_image = _resample(image, grid, self.fill)
            if label is not None:
                moved = _resample(label.to(image.dtype), grid, 0.0)
                out_label = (moved >= LABEL_THRESHOLD).to(label.dtype)
        out_image = apply_domain(out_image, image, params)
        return add_noise(out_image, image, params), out_label

    def forward(
        self, image: Tensor, label: Tensor | None = None, return_params: bool = False
    ) -> Tensor | tuple:
        """``(image, label)`` augmented alike (the inputs themselves when every switch is off).

        With ``label=None`` only the image is returned. ``return_params=True`` appends
        the parameters used: ``(image, label, params)`` or ``(image, params)``.
        """
        _check(image, label)
        if self.is_identity:
            params = AugmentParams2d.identity(image.shape[0])
            out_image, out_label = image, label
        else:
            params = self.sample(image.shape[0], image.shape[2:])
            out_image, out_label = self.apply(image, label, params)
        result: tuple = (out_image,) if label is None else (out_image, out_label)
        if return_params:
            result += (params,)
        return result if len(result) > 1 else result[0]


def _resample(x: Tensor, grid: Tensor, fill: float | None) -> Tensor:
    if fill is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=ALIGN_CORNERS)
    if fill == 0:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=ALIGN_CORNERS)
    # grid_sample pads with zeros: shift so that the fill value is zero.
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=ALIGN_CORNERS)
    return out.add_(fill)


def _check(image: Tensor, label: Tensor | None) -> None:
    if image.dim() != 4:
        raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"expected a floating-point image batch, got {image.dtype}")
    if label is not None:
        if label.dim() != 4 or label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"label {tuple(label.shape)} does not match image {tuple(image.shape)}: expected "
                f"(N, 1, H, W) with the image's N, H, W"
            )
        if label.is_complex():
            raise TypeError(f"expected a bool or real label batch, got {label.dtype}")
