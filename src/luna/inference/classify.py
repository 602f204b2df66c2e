"""Chunk classification: p(positive class) for the 3D chunk around each candidate centre.

The nodule classifier and the malignancy classifier both run through `classify_chunks`:
crops gathered into one preallocated float32 batch, ``batch_size`` at a time,
channels-last 3D, under ``torch.inference_mode`` and, on request, autocast.

A probability that is not a number in [0, 1] (NaN from weights that overflow, or
from float16 autocast) is a `LunaError` naming the model: read as a probability, a
NaN fails every threshold and would become "no nodule found".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from luna.ct import CHUNK_SHAPE, Ct
from luna.errors import LunaError
from luna.models import POSITIVE_CLASS

__all__ = ["classify_chunks"]


def classify_chunks(
    model: torch.nn.Module,
    ct: Ct,
    centers_xyz: Sequence[Sequence[float]],
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    source: str = "the classifier",
) -> np.ndarray:
    """p(positive class) for the chunk around each centre (float64, one per centre).

    ``source`` names the model in the error raised when its output is not a
    probability (see the module docstring).
    ``batch_size``: chunks per forward pass, by default 4 on the CPU and 32 on CUDA.
    On the CPU small batches are both faster and far lighter (measured on 192 chunks:
    92 chunks/s and +23 MiB with 4, 79/s and +358 MiB with 32).
    """
    n = len(centers_xyz)
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    device = torch.device(device)
    if batch_size is None:
        batch_size = 32 if device.type == "cuda" else 4
    shape = tuple(getattr(model, "chunk_shape", CHUNK_SHAPE))
    size = min(batch_size, n)
    buffer = torch.empty((size, 1, *shape), dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, size):
            stop = min(start + size, n)
            for k in range(start, stop):
                buffer[k - start, 0] = torch.from_numpy(ct.crop(centers_xyz[k], shape))
            batch = buffer[: stop - start].to(device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(batch)
            out[start:stop] = torch.softmax(logits.float(), dim=1)[:, POSITIVE_CLASS].cpu().numpy()
    bad = np.flatnonzero(~((out >= 0) & (out <= 1)))  # NaN fails both comparisons
    if bad.size:
        xyz = ", ".join(f"{v:.1f}" for v in centers_xyz[int(bad[0])])
        raise LunaError(
            f"{source} gave {out[bad[0]]} as a probability for {bad.size} of {n} chunks (the first "
            f"at xyz {xyz} mm in {ct.series_uid}): its weights are broken (a diverged training?) or "
            f"overflow{' under autocast: try without --amp' if amp_dtype is not None else ''}; use another checkpoint"
        )
    return out
