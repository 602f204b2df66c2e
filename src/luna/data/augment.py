"""3D augmentation of a batch of CT chunks, on whatever device the batch is on.

The training loop calls an `Augment3d` on each batch after moving it to the
device: workers only read chunks, and the GPU (or the main process on CPU) does
the resampling for the whole batch in one `grid_sample` call.

Conventions
-----------
Batches are ``(N, C, D, H, W)`` floating-point tensors of HU; D is the index axis
(head-foot), H the row axis, W the col axis, as in ``[index, row, col]`` arrays.
Every geometric parameter is expressed in voxels of the chunk and acts about
the chunk's geometric centre ``(size - 1) / 2`` along each axis.

Each sample gets one affine map, composed in this order (all optional):

1. ``flip``: mirror along each allowed axis with probability 1/2. A flip is
   exactly ``torch.flip`` on that dim (up to float rounding, < 0.01 HU).
   In-plane flips (row, col) are always plausible; the index axis is flipped too
   by default, because at the scale of a chunk a nodule has no preferred
   head-foot direction. Drop axis 0 from ``flip_axes`` for models that should see
   anatomy the right way up.
2. ``rotate``: turn about the index axis only (voxels are anisotropic along it,
   so any other rotation would mix 0.7 mm and 2.5 mm spacings). A positive angle
   turns the col axis toward the row axis: at +90 degrees a point at
   ``centre + (0, 0, r)`` goes to ``centre + (0, r, 0)``, and a point at
   ``(d, h, w)`` goes to ``(d, w, W - 1 - h)`` (square in-plane size).
   The index coordinate never changes.
3. ``scale``: one factor ``s`` per sample for all three axes (so the anisotropy
   is kept); ``s > 1`` enlarges the content (a blob of radius r gets radius s r).
4. ``offset``: a translation ``t`` in voxels (continuous, so sub-voxel shifts
   occur). Positive means toward higher indices: content at voxel ``p`` appears
   at ``p + t``.

In centred voxel coordinates ``p`` (d, h, w), content moves ``p -> s R F p + t``.
`warp` inverts that map, converts it to the normalised coordinates of
``F.affine_grid`` (``align_corners=False``, PyTorch's default, used for both
``affine_grid`` and ``grid_sample``; since the matrix is built in voxels and
converted with the same convention, the geometry does not depend on it), and
samples trilinearly. The book's error -- an offset written into a matrix row
that was then dropped -- cannot happen here: the translation is the last column
of the 3x4 ``theta`` and the tests check that a point moves.

Outside the chunk: the output is filled with air (``fill=-1000`` HU), the value
`luna.ct.crop` uses beyond the scan, rather than ``padding_mode="border"``,
which would smear whatever touches the chunk's edge (chest wall, table) into
streaks. ``fill=None`` selects border replication.

5. ``noise``: additive Gaussian noise, ``sigma`` in HU, zero mean, after
   resampling. The result is not clamped again (values can leave [-1000, 1000]
   by a few sigma).

Domain robustness: what differs between scanners, not between patients. These act
in-plane on each slice (the last two dims, whatever the batch's layout), after
the resampling and before ``noise``, in this order:

6. ``resolution``: half the samples are blurred by a Gaussian of sigma uniform in
   [0, ``resolution``] voxels (a softer kernel, coarser voxels), the other half
   sharpened, ``x + a (x - G_1(x))`` with ``a`` uniform in [0, ``resolution``] (a
   sharper kernel: overshoot at edges). Borders replicate the edge voxel.
7. ``intensity``: ``x -> -1000 + g (x + 1000) + o``: a gain ``g`` uniform in
   [1 - ``intensity``, 1 + ``intensity``] about air (so air stays air) and an offset
   ``o`` uniform in +-400 ``intensity`` HU: calibration and inspiration differ by
   tens of HU between scans (0.05: +-20 HU, and soft tissue moves by up to 50 HU).
8. ``texture``: noise as CT has it, correlated between neighbouring voxels
   (`luna.synth.imaging`): white noise shaped in the Fourier domain to a
   band-pass power spectrum ``(f + 0.25 f_p) exp(-2 (f / 2 f_p)^2)`` with a peak
   ``f_p`` uniform in [0.08, 0.35] cycles per voxel, and a standard deviation
   uniform in [0, ``texture``] HU per sample; each slice gets its own draw.

Randomness: per-sample parameters are drawn on the CPU from the module's
``torch.Generator`` (``seed``), always the same draws in the same order whatever
the switches, so switching one kind on or off does not change the others. Noise
is drawn on the batch's device from a generator seeded by one draw of that CPU
generator: the same seed gives the same output on the same device (CPU and CUDA
noise differ). Under DistributedDataParallel give each rank its own seed
(``seed + rank``).

When no geometric switch is on (or a batch happens to draw only identity maps),
no resampling happens: no cost, no interpolation blur, and with noise off the
input tensor itself is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from luna.ct import AIR_HU

__all__ = [
    "ALIGN_CORNERS", "AUGMENT_DEFAULTS", "AffineParams", "Augment3d", "AugmentParams", "RandomAffine", "add_noise",
    "apply_domain", "ct_noise", "warp"]

ALIGN_CORNERS = False
"""Used for both ``F.affine_grid`` and ``F.grid_sample``; see the module docstring."""

AUGMENT_DEFAULTS: dict[str, float | bool] = {
    "flip": True,
    "offset": 0.05,  # the book's 0.1 in grid units [-1, 1]: 5% of the chunk, 1.6 slices
    "scale": 0.2,
    "rotate": 180.0,
    "noise": 25.0,
    "intensity": 0.05,  # +-5% gain about air and +-20 HU
    "texture": 20.0,  # HU, CT-like correlated noise
    "resolution": 1.0,  # blur sigma up to 1 voxel, or sharpening up to 1
}
"""Magnitudes used when a switch is turned on without one (`Augment3d.from_switches`)."""


@dataclass(frozen=True)
class AffineParams:
    """The random parameters of one batch (CPU tensors, float64), for ``NDIM`` axes.

    ``flip`` (N, NDIM) bool per axis; ``angle`` (N,) degrees; ``scale`` (N,)
    factors; ``offset`` (N, NDIM) voxels; ``noise_sigma`` in HU and ``noise_seed``
    for the device generator. Subclasses give ``NDIM`` and ``matrices``.

    The domain parameters (None: not applied), each (N,): ``gain`` and ``shift``
    (HU) of ``intensity``; ``texture_sigma`` (HU) and ``texture_peak`` (cycles per
    voxel) with ``texture_seed``; ``blur`` (sigma in voxels) and ``sharpen``
    (amount) of ``resolution``, one of them 0 for each sample.
    """

    flip: Tensor
    angle: Tensor
    scale: Tensor
    offset: Tensor
    noise_sigma: float = 0.0
    noise_seed: int = 0
    gain: Tensor | None = None
    shift: Tensor | None = None
    texture_sigma: Tensor | None = None
    texture_peak: Tensor | None = None
    texture_seed: int = 0
    blur: Tensor | None = None
    sharpen: Tensor | None = None

    NDIM: ClassVar[int] = 0

    @classmethod
    def identity(cls, n: int):
        return cls(
            flip=torch.zeros(n, cls.NDIM, dtype=torch.bool),
            angle=torch.zeros(n, dtype=torch.float64),
            scale=torch.ones(n, dtype=torch.float64),
            offset=torch.zeros(n, cls.NDIM, dtype=torch.float64),
        )

    def __len__(self) -> int:
        return len(self.scale)


@dataclass(frozen=True)
class AugmentParams(AffineParams):
    """`AffineParams` of 3D chunks: axes (index, row, col); the angle turns about the index axis."""

    NDIM: ClassVar[int] = 3

    def matrices(self) -> Tensor:
        """(N, 4, 4) float64: where content moves, in centred voxel coordinates (d, h, w, 1)."""
        n = len(self)
        flips = torch.where(self.flip, -1.0, 1.0).to(torch.float64)
        radians = torch.deg2rad(self.angle.to(torch.float64))
        cos, sin = torch.cos(radians), torch.sin(radians)
        rotation = torch.zeros(n, 3, 3, dtype=torch.float64)
        rotation[:, 0, 0] = 1.0
        # h' = h cos + w sin, w' = -h sin + w cos: +90 degrees takes +w to +h.
        rotation[:, 1, 1], rotation[:, 1, 2] = cos, sin
        rotation[:, 2, 1], rotation[:, 2, 2] = -sin, cos
        linear = self.scale.to(torch.float64)[:, None, None] * rotation * flips[:, None, :]
        matrix = torch.zeros(n, 4, 4, dtype=torch.float64)
        matrix[:, :3, :3] = linear
        matrix[:, :3, 3] = self.offset.to(torch.float64)
        matrix[:, 3, 3] = 1.0
        return matrix


def warp(x: Tensor, matrix: Tensor, *, fill: float | None = AIR_HU, mode: str = "bilinear") -> Tensor:
    """Move the content of ``x`` (N, C, D, H, W) by ``matrix`` (N, 4, 4) or (4, 4).

    ``matrix`` maps centred voxel coordinates (d, h, w, 1) of the input to those of
    the output (content at ``p`` appears at ``matrix @ p``). Voxels that come from
    outside ``x`` are ``fill`` (None: the nearest edge voxel). ``mode`` is
    ``grid_sample``'s ("bilinear" is trilinear in 3D; "nearest" for label maps).
    """
    _check_batch(x)
    n, sizes = x.shape[0], x.shape[2:]
    matrix = matrix.to(device="cpu", dtype=torch.float64)
    if matrix.dim() == 2:
        matrix = matrix.expand(n, 4, 4)
    if matrix.shape != (n, 4, 4):
        raise ValueError(f"expected {n} matrices of shape (4, 4), got {tuple(matrix.shape)}")
    # Output voxel -> input voxel, then into normalised coordinates (align_corners=False:
    # a voxel is 2 / size wide) and into affine_grid's (x, y, z) = (w, h, d) order.
    sampling = torch.linalg.inv(matrix)
    to_normalised = torch.diag(torch.tensor([2.0 / s for s in sizes] + [1.0], dtype=torch.float64))
    theta = to_normalised @ sampling @ torch.linalg.inv(to_normalised)
    reverse = torch.tensor([2, 1, 0, 3])
    theta = theta[:, reverse][:, :, reverse][:, :3, :]
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=ALIGN_CORNERS)
    if fill is None:
        return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=ALIGN_CORNERS)
    if fill == 0:
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=ALIGN_CORNERS)
    # grid_sample pads with zeros: shift so that the fill value is zero.
    out = F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=ALIGN_CORNERS)
    return out.add_(fill)


def add_noise(out: Tensor, x: Tensor, params: AffineParams) -> Tensor:
    """``out`` plus the Gaussian noise of ``params`` (seeded on ``out``'s device).

    ``out`` is overwritten when it is a tensor of our own (a resampled batch), never
    when it is still the caller's input ``x``.
    """
    if params.noise_sigma <= 0:
        return out
    device_generator = torch.Generator(device=out.device)
    device_generator.manual_seed(params.noise_seed)
    draw = torch.randn(out.shape, generator=device_generator, device=out.device, dtype=out.dtype)
    if out is x:
        return torch.add(x, draw, alpha=params.noise_sigma)
    return out.add_(draw, alpha=params.noise_sigma)


def apply_domain(out: Tensor, x: Tensor, params: AffineParams) -> Tensor:
    """``out`` with the domain augmentations of ``params`` (resolution, intensity, texture), in-plane.

    Works on any batch whose first dim is the sample and whose last two are rows and
    columns. ``out`` is overwritten only when it is not the caller's input ``x``.
    """
    n = out.shape[0]
    tail = (1,) * (out.dim() - 1)
    if params.blur is not None and params.sharpen is not None:
        blur = params.blur.to(torch.float64)
        sharpen = params.sharpen.to(torch.float64)
        if bool((blur > 0).any()) or bool((sharpen > 0).any()):
            # One blurred copy per kind: sigma per sample for the blur, 1 voxel for sharpening.
            blurred = _gaussian_inplane(out, blur)
            smooth = _gaussian_inplane(out, torch.ones_like(sharpen))
            amount = sharpen.to(device=out.device, dtype=out.dtype).reshape(n, *tail)
            out = blurred + amount * (out - smooth)
    if params.gain is not None and params.shift is not None:
        gain = params.gain.to(device=out.device, dtype=out.dtype).reshape(n, *tail)
        shift = params.shift.to(device=out.device, dtype=out.dtype).reshape(n, *tail)
        if out is x:
            out = (x - AIR_HU) * gain + (AIR_HU + shift)
        else:
            out.sub_(AIR_HU).mul_(gain).add_(AIR_HU + shift)
    if params.texture_sigma is not None and params.texture_peak is not None and bool((params.texture_sigma > 0).any()):
        noise = ct_noise(out.shape, params.texture_peak, params.texture_seed, device=out.device, dtype=out.dtype)
        sigma = params.texture_sigma.to(device=out.device, dtype=out.dtype).reshape(n, *tail)
        out = out + noise * sigma if out is x else out.add_(noise * sigma)
    return out


def ct_noise(shape, peak: Tensor, seed: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Unit-variance noise of ``shape`` (N, ..., H, W) with CT's band-pass spectrum in the last two dims.

    ``peak`` (N,): the spectrum's peak per sample, in cycles per voxel; the shape of
    the spectrum is `luna.synth.imaging`'s, ``(f + 0.25 f_p) exp(-2 (f / 2 f_p)^2)``.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    h, w = int(shape[-2]), int(shape[-1])
    white = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.rfftfreq(w, device=device)[None, :]
    f = torch.sqrt(fy * fy + fx * fx)
    n = int(shape[0])
    p = peak.to(device=device, dtype=torch.float32).reshape(n, *(1,) * (len(shape) - 1))
    power = (f + 0.25 * p) * torch.exp(-2.0 * (f / (2.0 * p)) ** 2)
    # Normalise over the full spectrum (the half spectrum counts its mirrored columns twice).
    weight = torch.full((w // 2 + 1,), 2.0, device=device)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    mean_power = (power * weight).sum(dim=(-2, -1), keepdim=True) / (h * w)
    amplitude = torch.sqrt(power / mean_power)
    noise = torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=(h, w))
    return noise.to(dtype)


def _gaussian_inplane(x: Tensor, sigma: Tensor) -> Tensor:
    """``x`` blurred in its last two dims by a Gaussian of ``sigma`` voxels per sample (0: unchanged)."""
    n = x.shape[0]
    h, w = x.shape[-2], x.shape[-1]
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.to(torch.float64).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (taps[None, :] / s) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (taps[None, :] == 0).to(torch.float64))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    planes = x.reshape(n, -1, h, w)
    per = planes.shape[1]
    k = kernel.to(device=x.device, dtype=x.dtype).repeat_interleave(per, dim=0)
    flat = planes.reshape(1, n * per, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, k[:, None, :, None], groups=n * per)
    flat = F.conv2d(flat, k[:, None, None, :], groups=n * per)
    return flat.reshape(x.shape)


def _check_batch(x: Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"expected a (N, C, D, H, W) batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point batch, got {x.dtype}")


class RandomAffine(nn.Module):
    """What `Augment3d` and `luna.data.augment2d.Augment2d` share: the switches, their
    checks, and the per-sample parameter draws (always the same draws in the same
    order, whatever the switches). A subclass names its ``AXES``, its ``DEFAULTS``
    (the magnitudes `from_switches` uses) and its ``Params`` record, and applies them.
    """

    AXES: tuple[str, ...] = ()
    DEFAULTS: dict[str, float | bool] = {}
    Params: type = object

    def __init__(
        self,
        flip: bool = False,
        offset: float = 0.0,
        scale: float = 0.0,
        rotate: float = 0.0,
        noise: float = 0.0,
        intensity: float = 0.0,
        texture: float = 0.0,
        resolution: float = 0.0,
        *,
        flip_axes: Sequence[int] | None = None,
        fill: float | None = AIR_HU,
        seed: int | None = None,
    ):
        super().__init__()
        flip_axes = range(len(self.AXES)) if flip_axes is None else flip_axes
        if not 0 <= offset <= 0.5:
            raise ValueError(f"offset is a fraction of the size of each axis in [0, 0.5], got {offset}")
        if not 0 <= scale < 1:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        if not 0 <= rotate <= 180:
            raise ValueError(f"rotate is a maximum angle in degrees in [0, 180], got {rotate}")
        if not noise >= 0:
            raise ValueError(f"noise is a standard deviation in HU >= 0, got {noise}")
        if not 0 <= intensity < 0.5:
            raise ValueError(f"intensity is a relative gain change in [0, 0.5), got {intensity}")
        if not texture >= 0:
            raise ValueError(f"texture is a standard deviation in HU >= 0, got {texture}")
        if not 0 <= resolution <= 3:
            raise ValueError(f"resolution is a blur sigma in voxels (and sharpening amount) in [0, 3], got {resolution}")
        if any(axis not in range(len(self.AXES)) for axis in flip_axes):
            names = ", ".join(f"{i} ({name})" for i, name in enumerate(self.AXES))
            raise ValueError(f"flip_axes are among {names}, got {tuple(flip_axes)}")
        self.flip = bool(flip)
        self.offset = float(offset)
        self.scale = float(scale)
        self.rotate = float(rotate)
        self.noise = float(noise)
        self.intensity = float(intensity)
        self.texture = float(texture)
        self.resolution = float(resolution)
        self.flip_axes = tuple(sorted(set(int(a) for a in flip_axes)))
        self.fill = fill
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    @classmethod
    def from_switches(
        cls,
        flip: bool = False,
        offset: bool = False,
        scale: bool = False,
        rotate: bool = False,
        noise: bool = False,
        intensity: bool = False,
        texture: bool = False,
        resolution: bool = False,
        **kwargs,
    ):
        """On/off switches (command-line flags) with the class's ``DEFAULTS`` magnitudes."""
        d = cls.DEFAULTS
        return cls(
            flip=bool(flip),
            offset=float(d["offset"]) if offset else 0.0,
            scale=float(d["scale"]) if scale else 0.0,
            rotate=float(d["rotate"]) if rotate else 0.0,
            noise=float(d["noise"]) if noise else 0.0,
            intensity=float(d["intensity"]) if intensity else 0.0,
            texture=float(d["texture"]) if texture else 0.0,
            resolution=float(d["resolution"]) if resolution else 0.0,
            **kwargs,
        )

    @property
    def is_geometric(self) -> bool:
        """Whether any switch moves voxels (otherwise no resampling ever happens)."""
        return bool((self.flip and self.flip_axes) or self.offset or self.scale or self.rotate)

    @property
    def is_domain(self) -> bool:
        """Whether any domain switch (resolution, intensity, texture) is on."""
        return bool(self.intensity or self.texture or self.resolution)

    @property
    def is_identity(self) -> bool:
        return not self.is_geometric and not self.noise and not self.is_domain

    def extra_repr(self) -> str:
        return (
            f"flip={self.flip}, flip_axes={self.flip_axes}, offset={self.offset}, scale={self.scale}, "
            f"rotate={self.rotate}, noise={self.noise}, intensity={self.intensity}, texture={self.texture}, "
            f"resolution={self.resolution}, fill={self.fill}"
        )

    def sample(self, n: int, size: Sequence[int]):
        """Draw the parameters of a batch of ``n`` items of ``size`` voxels (one per axis)."""
        g = self.generator
        k = len(self.AXES)
        # Always the same draws in the same order, whatever the switches.
        flip_draw = torch.rand(n, k, generator=g, dtype=torch.float64) < 0.5
        offset_draw = torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1
        scale_draw = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        angle_draw = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        noise_seed = int(torch.randint(0, 2**62, (), generator=g))
        # The domain draws come after the geometric ones, so that those stay what they were.
        gain_draw = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        shift_draw = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        texture_draw = torch.rand(n, generator=g, dtype=torch.float64)
        peak_draw = torch.rand(n, generator=g, dtype=torch.float64)
        sharpen_draw = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
        amount_draw = torch.rand(n, generator=g, dtype=torch.float64)
        texture_seed = int(torch.randint(0, 2**62, (), generator=g))

        allowed = torch.zeros(k, dtype=torch.bool)
        if self.flip:
            allowed[list(self.flip_axes)] = True
        sizes = torch.tensor([float(s) for s in size], dtype=torch.float64)
        domain = {}
        if self.intensity:
            domain.update(gain=1.0 + gain_draw * self.intensity, shift=shift_draw * (400.0 * self.intensity))
        if self.texture:
            domain.update(texture_sigma=texture_draw * self.texture, texture_peak=0.08 + 0.27 * peak_draw,
                          texture_seed=texture_seed)
        if self.resolution:
            amount = amount_draw * self.resolution
            domain.update(blur=torch.where(sharpen_draw, 0.0, amount), sharpen=torch.where(sharpen_draw, amount, 0.0))
        return self.Params(
            flip=flip_draw & allowed,
            angle=angle_draw * self.rotate,
            scale=1.0 + scale_draw * self.scale,
            offset=offset_draw * (self.offset * sizes),
            noise_sigma=self.noise,
            noise_seed=noise_seed,
            **domain,
        )


class Augment3d(RandomAffine):
    """Random flip / offset / scale / rotate / noise, and resolution / intensity / texture, for (N, C, D, H, W) batches.

    A switch is off when its magnitude is 0 (or False):

    - ``flip``: mirror each axis of ``flip_axes`` (0 index, 1 row, 2 col) with probability 1/2;
    - ``offset``: translation up to ``offset`` x the size of each axis, in voxels
      (0.1 on 32x48x48: up to 3.2, 4.8, 4.8 voxels), uniform;
    - ``scale``: factor uniform in [1 - scale, 1 + scale];
    - ``rotate``: angle uniform in [-rotate, rotate] degrees about the index axis (180: any);
    - ``noise``: Gaussian noise with this standard deviation in HU;
    - ``resolution``, ``intensity``, ``texture``: the domain augmentations of the
      module docstring (maximum blur sigma in voxels, relative gain, noise in HU).

    Conventions (axis directions, padding, ``align_corners``) are in the module
    docstring. ``forward(x, return_params=True)`` also returns the `AugmentParams`
    used; `apply` replays given parameters (for instance on a label map).
    """

    AXES = ("index", "row", "col")
    DEFAULTS = AUGMENT_DEFAULTS
    Params = AugmentParams

    def apply(self, x: Tensor, params: AugmentParams, *, mode: str = "bilinear", noise: bool = True) -> Tensor:
        """Transform ``x`` with given parameters (``noise=False`` for label maps: geometry only)."""
        _check_batch(x)
        if len(params) != x.shape[0]:
            raise ValueError(f"{len(params)} sets of parameters for a batch of {x.shape[0]}")
        out = x
        matrix = params.matrices()
        if not torch.equal(matrix, torch.eye(4, dtype=torch.float64).expand_as(matrix)):
            out = warp(x, matrix, fill=self.fill, mode=mode)
        if noise:
            out = apply_domain(out, x, params)
            out = add_noise(out, x, params)
        return out

    def forward(self, x: Tensor, return_params: bool = False) -> Tensor | tuple[Tensor, AugmentParams]:
        """The augmented batch (the input itself when every switch is off)."""
        _check_batch(x)
        if self.is_identity:
            return (x, AugmentParams.identity(x.shape[0])) if return_params else x
        params = self.sample(x.shape[0], x.shape[2:])
        out = self.apply(x, params)
        return (out, params) if return_params else out
