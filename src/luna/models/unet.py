"""The 2D UNet that turns axial CT slices into per-pixel nodule probabilities.

Input: ``(N, in_channels, H, W)`` HU, the slice to segment plus ``context_slices``
neighbours above and below it stacked as channels (``in_channels = 2 *
context_slices + 1``, 7 by default: 3 above, the slice, 3 below). Integer (int16)
or floating-point batches are accepted. Inside the model the HU are clamped to
[-1000, 1000], multiplied by ``hu_scale`` and batch-normalised (``input_batchnorm``)
before the UNet proper.

Output: `SegmentationUNet.forward` returns probabilities ``(N, n_classes, H', W')``
after a sigmoid; `SegmentationUNet.forward_logits` the same before it. With
``padding=True`` (the default) ``H' = H`` and ``W' = W`` for any sides divisible by
``2 ** (depth - 1)``; with ``padding=False`` every convolution is "valid" and the
output is smaller (`SegmentationUNet.output_shape`). `luna.losses.dice_loss` takes
the probabilities: soft Dice is defined on them, and it has none of the
``log(sigmoid)`` underflow that makes cross-entropy want logits. The logits are
there for a BCE term (``F.binary_cross_entropy_with_logits``) or for thresholding
without a sigmoid.

Layout
------
Module names are those of the book's ``UNetWrapper`` ("Deep Learning with
PyTorch"), so its segmentation checkpoints load unchanged (`luna.models.checkpoint`,
``model_name`` ``"UNetWrapper"`` is an alias of ``"SegmentationUNet"``)::

    input_batchnorm                 BatchNorm2d(in_channels)
    unet.down_path.{i}.block        i = 0 .. depth-1, 2 ** (wf + i) channels
    unet.up_path.{j}.up             j = 0 .. depth-2, deepest first
    unet.up_path.{j}.conv_block.block
    unet.last                       Conv2d(2 ** wf, n_classes, 1)

A ``block`` is ``Sequential(Conv2d(3x3), ReLU, BatchNorm2d, Conv2d(3x3), ReLU,
BatchNorm2d)`` (indices 0-5; the convolutions are ``block.0`` and ``block.3``) with
``batch_norm=True``, and ``Sequential(Conv2d, ReLU, Conv2d, ReLU)`` (convolutions
``block.0`` and ``block.2``) without. Between down blocks a 2x2 average pool halves
the image. ``up`` is ``ConvTranspose2d(k=2, s=2)`` for ``up_mode="upconv"``, or
``Sequential(Upsample(x2, bilinear), Conv2d(k=1))`` (parameters under ``up.1``) for
``"upsample"``; either halves the channels, and the up block's ``conv_block``
sees the upsampled tensor concatenated with the down path's tensor of the same
level (centre-cropped to the upsampled size when ``padding=False``).

HU scale
--------
The book trained on raw clamped HU: its input batch norm's running statistics are
in HU (mean about -500, variance about 3e5), and a book checkpoint must be run with
``hu_scale=1.0``, which `SegmentationUNet.args_from_state_dict` gives files
without our ``model_args``. New models use ``hu_scale=1/1000`` (`DEFAULT_HU_SCALE`):
the input batch norm then sees values in [-1, 1] and keeps running statistics of
order 1, the scale its defaults (running variance 1, eps 1e-5) and half precision
are made for; a raw-HU variance of 3e5 does not even fit in float16 (largest value
65504), so a raw-HU model cannot be run with ``model.half()``. The factor is
recorded in ``model_args``, so a checkpoint always brings the scale its statistics
were learnt on.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from luna.ct import DEFAULT_HU_RANGE
from luna.models.registry import register_model

__all__ = ["DEFAULT_HU_SCALE", "UP_MODES", "SegmentationUNet", "UNet"]

PRIOR = 0.01
"""p(nodule) of every pixel before training (the bias of ``unet.last``)."""
DEFAULT_HU_SCALE = 1.0 / 1000.0
"""``hu_scale`` of new models: clamped HU in [-1000, 1000] -> [-1, 1] (module docstring)."""

UP_MODES = ("upconv", "upsample")

_HU_MIN, _HU_MAX = DEFAULT_HU_RANGE if DEFAULT_HU_RANGE is not None else (-1000, 1000)


def _conv_block(in_channels: int, out_channels: int, padding: bool, batch_norm: bool) -> nn.Sequential:
    pad = 1 if padding else 0
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        # ReLU in place: its input (the conv output) is needed by nothing else, and
        # every large allocation avoided saves page faults on our machines.
        layers += [nn.Conv2d(c_in, out_channels, kernel_size=3, padding=pad), nn.ReLU(inplace=True)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


class ConvPair(nn.Module):
    """Two 3x3 convolutions (see the module docstring for the layout)."""

    def __init__(self, in_channels: int, out_channels: int, padding: bool, batch_norm: bool) -> None:
        super().__init__()
        self.block = _conv_block(in_channels, out_channels, padding, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """Upsample x2 halving the channels, join the skip tensor, two 3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, up_mode: str, padding: bool, batch_norm: bool) -> None:
        super().__init__()
        if up_mode == "upconv":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )
        # Input: out_channels upsampled + out_channels from the skip = in_channels.
        self.conv_block = ConvPair(2 * out_channels, out_channels, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        h, w = x.shape[-2:]
        if skip.shape[-2:] != (h, w):  # padding=False: keep the skip's centre
            top = (skip.shape[-2] - h) // 2
            left = (skip.shape[-1] - w) // 2
            skip = skip[..., top : top + h, left : left + w]
        return self.conv_block(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """The UNet proper (``SegmentationUNet.unet``): down path, up path, 1x1 ``last``; logits out."""

    def __init__(
        self, in_channels: int, n_classes: int, depth: int, wf: int, padding: bool, batch_norm: bool, up_mode: str
    ) -> None:
        super().__init__()
        widths = [2 ** (wf + i) for i in range(depth)]
        self.down_path = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.down_path.append(ConvPair(previous, width, padding, batch_norm))
            previous = width
        self.up_path = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], up_mode, padding, batch_norm) for i in reversed(range(depth - 1))
        )
        self.last = nn.Conv2d(widths[0], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.down_path):
            x = down(x)
            if i < len(self.down_path) - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for up, skip in zip(self.up_path, reversed(skips)):
            x = up(x, skip)
        return self.last(x)


class SegmentationUNet(nn.Module):
    """2D UNet on HU slices with context; defaults reproduce the book's ``UNetWrapper``'s layout.

    Args:
        in_channels: slices per input, ``2 * context_slices + 1`` (default 7).
        n_classes: output channels (default 1: nodule).
        depth: resolution levels (default 3); the input is halved ``depth - 1`` times.
        wf: log2 of the first level's channels (default 4: 16, 32, 64).
        padding: "same" 3x3 convolutions (default True): output size = input size.
            False: "valid" convolutions, a smaller output (`output_shape`).
        batch_norm: a BatchNorm2d after each ReLU in the blocks (default True).
        up_mode: ``"upconv"`` (transposed convolution, default) or ``"upsample"``
            (bilinear upsampling then a 1x1 convolution).
        hu_scale: factor on the clamped HU before ``input_batchnorm``: 1/1000 for new
            models, 1.0 for the book's checkpoints (module docstring).

    ``model_args`` holds these options as plain values, so a checkpoint can record
    them and `luna.models.checkpoint.build_model` can rebuild the same network.
    """

    def __init__(
        self,
        in_channels: int = 7,
        n_classes: int = 1,
        depth: int = 3,
        wf: int = 4,
        padding: bool = True,
        batch_norm: bool = True,
        up_mode: str = "upconv",
        hu_scale: float = DEFAULT_HU_SCALE,
    ) -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 1 or depth < 1 or wf < 0:
            raise ValueError(
                f"in_channels, n_classes and depth must be >= 1 and wf >= 0, got "
                f"{in_channels}, {n_classes}, {depth}, {wf}"
            )
        if up_mode not in UP_MODES:
            raise ValueError(f"up_mode must be one of {UP_MODES}, got {up_mode!r}")
        if not (math.isfinite(hu_scale) and hu_scale > 0):
            raise ValueError(f"hu_scale must be a positive number, got {hu_scale}")
        self.model_args = {
            "in_channels": int(in_channels),
            "n_classes": int(n_classes),
            "depth": int(depth),
            "wf": int(wf),
            "padding": bool(padding),
            "batch_norm": bool(batch_norm),
            "up_mode": str(up_mode),
            "hu_scale": float(hu_scale),
        }
        self.in_channels = int(in_channels)
        self.depth = int(depth)
        self.padding = bool(padding)
        self.hu_scale = float(hu_scale)

        # Names are the book's: they are the keys of its checkpoints.
        self.input_batchnorm = nn.BatchNorm2d(in_channels)
        self.unet = UNet(in_channels, n_classes, depth, wf, padding, batch_norm, up_mode)
        self._init_weights()

    def _init_weights(self) -> None:
        # Convolutions: Kaiming-normal, fan_in, ReLU gain (each is followed by a
        # ReLU), zero biases; batch norms start as identity. The up convolutions are
        # followed by no ReLU: their output joins the batch-normalised skip tensor,
        # so they get gain 1 over the products that really sum into one output
        # pixel (in_channels for a 1x1 conv and for a k=2, s=2 transposed conv, whose
        # kernel taps never overlap; torch's fan_in for a transposed weight would
        # count out_channels * 4 instead): unit-variance input, unit-variance output,
        # the same scale as the skip half of the concatenation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.unet.up_path:
            conv = block.up if isinstance(block.up, nn.ConvTranspose2d) else block.up[1]
            nn.init.normal_(conv.weight, std=conv.in_channels**-0.5)
            nn.init.zeros_(conv.bias)
        # The last layer feeds a sigmoid, not a ReLU. Kaiming weights over its 16
        # batch-normalised inputs start with logits of std ~1.2 (measured): every pixel gets a
        # random probability from the random features, a pattern the first steps
        # must unlearn. Small weights and a bias at the prior of a nodule voxel
        # (p = 0.01, as in RetinaNet's classification head) start every pixel
        # near "no nodule": starting at p = 0.5 instead, the predicted mass of a
        # batch is half its pixels, soft Dice's gradient on a false positive is
        # ~2A/P^2 (A nodule, P predicted voxels), next to nothing, and the
        # false-negative term drove the model to mark everything (measured on the
        # demo set: recall 1.0, precision 0.02 after 3 epochs).
        nn.init.normal_(self.unet.last.weight, std=0.01)
        nn.init.constant_(self.unet.last.bias, math.log(PRIOR / (1 - PRIOR)))

    # --- checkpoints -----------------------------------------------------------

    @classmethod
    def args_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict | None:
        """The constructor options a state dict was made with, as far as it tells; None if not ours.

        in_channels, n_classes, depth, wf, batch_norm and up_mode follow from the
        tensors. ``padding`` leaves no trace in them and is taken as True (the book's
        choice). ``hu_scale`` is 1.0: files that do not record our ``model_args``
        (the book's, bare state dicts) were trained on raw HU. Keys must be unprefixed.
        """
        try:
            first = state_dict["unet.down_path.0.block.0.weight"]
            last = state_dict["unet.last.weight"]
            input_bn = state_dict["input_batchnorm.weight"]
        except (KeyError, TypeError):
            return None
        tensors = (first, last, input_bn)
        if not all(isinstance(t, torch.Tensor) for t in tensors) or (first.dim(), last.dim()) != (4, 4):
            return None
        width = int(first.shape[0])
        if width < 1 or width & (width - 1):
            return None
        depth = 0
        while f"unet.down_path.{depth}.block.0.weight" in state_dict:
            depth += 1
        # With batch norm, block.2 is one (1-d weight); without, it is the second conv.
        second = state_dict.get("unet.down_path.0.block.2.weight")
        batch_norm = not (isinstance(second, torch.Tensor) and second.dim() == 4)
        up_mode = "upsample" if "unet.up_path.0.up.1.weight" in state_dict else "upconv"
        return {
            "in_channels": int(input_bn.shape[0]),
            "n_classes": int(last.shape[0]),
            "depth": depth,
            "wf": width.bit_length() - 1,
            "padding": True,
            "batch_norm": batch_norm,
            "up_mode": up_mode,
            "hu_scale": 1.0,
        }

    # --- sizes -----------------------------------------------------------------

    def _output_side(self, side: int) -> int | None:
        """Output length of one input side, or None when the side does not fit."""
        if self.padding:
            step = 2 ** (self.depth - 1)
            return side if side > 0 and side % step == 0 else None
        for level in range(self.depth):
            side -= 4  # two valid 3x3 convolutions
            if side < 1:
                return None
            if level < self.depth - 1:
                if side % 2:  # the pool would drop a row, misaligning the skip crop
                    return None
                side //= 2
        for _ in range(self.depth - 1):
            side = 2 * side - 4
            if side < 1:
                return None
        return side

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of the output for an input of ``height`` x ``width``; ValueError if it does not fit."""
        out = []
        for name, side in (("height", height), ("width", width)):
            result = self._output_side(int(side))
            if result is None:
                raise ValueError(self._size_message(name, int(side)))
            out.append(result)
        return out[0], out[1]

    def _size_message(self, name: str, side: int) -> str:
        if self.padding:
            step = 2 ** (self.depth - 1)
            return (
                f"input {name} {side} does not fit a depth-{self.depth} UNet: it halves the "
                f"image {self.depth - 1} times, so use a multiple of {step} (pad or crop the slice)"
            )
        fits = [s for s in range(max(1, side - 64), side + 65) if self._output_side(s) is not None]
        nearest = sorted(fits, key=lambda s: (abs(s - side), s))[:2]
        hint = f"the nearest that fit are {' and '.join(map(str, sorted(nearest)))}" if nearest else "use a larger input"
        return (
            f"input {name} {side} does not fit a depth-{self.depth} UNet without padding (valid "
            f"convolutions need an even size before every pooling and a positive output); {hint}"
        )

    # --- forward ---------------------------------------------------------------

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes, H', W') for HU slices (N, in_channels, H, W), any real dtype."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected slices of shape (N, {self.in_channels}, H, W) (the slice and its "
                f"context as channels), got {tuple(x.shape)}"
            )
        self.output_shape(x.shape[2], x.shape[3])
        if not x.is_floating_point():
            x = x.to(self.input_batchnorm.weight.dtype).clamp_(_HU_MIN, _HU_MAX)
        else:
            # Idempotent for slices that were already clamped (as the data
            # pipeline's are); keeps stray inputs in the range the batch norm knows.
            x = x.clamp(_HU_MIN, _HU_MAX)
        if self.hu_scale != 1.0:
            x = x.mul_(self.hu_scale)  # x is a fresh tensor from clamp
        return self.unet(self.input_batchnorm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, n_classes, H', W') in [0, 1] for HU slices (N, in_channels, H, W).

        The sigmoid runs in float32 even under autocast: the segmentation's operating
        thresholds sit at 0.999 and above, where bfloat16 (8 bits) rounds 0.996 to 1.
        """
        return torch.sigmoid(self.forward_logits(x).float())


register_model(
    "SegmentationUNet",
    SegmentationUNet,
    kind="segmenter",
    aliases=("UNetWrapper",),
    infer_args=SegmentationUNet.args_from_state_dict,
)
