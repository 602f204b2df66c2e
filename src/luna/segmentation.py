"""Full-CT segmentation: a probability volume aligned with the CT, and saving it as an image.

`segment_ct` runs the 2D UNet over every axial slice of a CT, each with its context
slices above and below as channels (at the volume's ends the nearest slice repeats,
as the model was trained). Slices go through the model in batches, under
``torch.inference_mode`` and, on request, autocast; one input buffer is reused for
every batch, because allocating and freeing large tensors in a loop costs more than
the arithmetic on our machines (DESIGN.md). Slices whose size the UNet cannot take
(not a multiple of its down-sampling) are padded with air and cropped back.

`save_volume_image` writes the probabilities (or a thresholded mask) with the CT's
geometry as ``.mha`` / ``.nii.gz``, so it overlays the CT in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from luna.ct import AIR_HU, Ct
from luna.errors import LunaError

__all__ = ["context_slices", "save_volume_image", "segment_ct"]


def context_slices(volume: np.ndarray, index: int, context: int) -> np.ndarray:
    """Slices ``index - context .. index + context`` of ``volume`` (2 * context + 1, H, W), ends repeated."""
    picks = np.clip(np.arange(index - context, index + context + 1), 0, volume.shape[0] - 1)
    return volume[picks]


@torch.inference_mode()
def segment_ct(
    model: torch.nn.Module,
    ct: Ct,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """p(nodule) for every voxel of ``ct`` (float32, ``ct.shape_irc``)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    context = (model.in_channels - 1) // 2
    multiple = 2 ** (getattr(model, "depth", 1) - 1)
    depth, height, width = ct.hu.shape
    pad_h, pad_w = -height % multiple, -width % multiple
    hu = torch.from_numpy(ct.hu)
    out = np.empty(ct.hu.shape, dtype=np.float32)
    buffer = torch.empty((batch_size, 2 * context + 1, height + pad_h, width + pad_w), dtype=torch.float32, device=device)
    if pad_h or pad_w:
        buffer.fill_(AIR_HU)
    starts = range(0, depth, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="segmentation", unit="batch", leave=False)
    for start in starts:
        count = min(batch_size, depth - start)
        picks = torch.clamp(torch.arange(start - context, start + count + context), 0, depth - 1)
        slab = hu[picks].to(device, non_blocking=True)  # (count + 2c, H, W), one copy per batch
        # window j covers slab[j : j + 2c + 1]: the context of slice start + j
        windows = slab.unfold(0, 2 * context + 1, 1).permute(0, 3, 1, 2)
        buffer[:count, :, :height, :width].copy_(windows)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probabilities = model(buffer[:count])
        out[start : start + count] = probabilities[:, 0, :height, :width].float().cpu().numpy()
    return out


def save_volume_image(volume: np.ndarray, ct: Ct, path: str | Path, *, threshold: float | None = None) -> Path:
    """Write ``volume`` (CT-shaped) with ``ct``'s geometry; with ``threshold`` as a 0/1 uint8 mask."""
    path = Path(path)
    if volume.shape != ct.hu.shape:
        raise ValueError(f"volume shape {volume.shape} differs from the CT's {ct.hu.shape}")
    data = (volume >= threshold).astype(np.uint8) if threshold is not None else volume.astype(np.float32)
    image = sitk.GetImageFromArray(data)
    ct.geometry.apply_to_sitk(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial{''.join(path.suffixes)}")
    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        temporary.replace(path)
    except (RuntimeError, OSError) as err:
        temporary.unlink(missing_ok=True)
        raise LunaError(f"{path}: cannot write the image ({err}); check the folder and free space") from None
    return path
