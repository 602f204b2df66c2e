"""Chunk classification: p(positive class) for the 3D chunk around each candidate centre.

The nodule classifier and the malignancy classifier both run through `classify_chunks`:
crops gathered into one preallocated float32 batch, ``batch_size`` at a time,
channels-last 3D, under ``torch.inference_mode`` and, on request, autocast.

Test-time flips (``views``): each chunk is classified as it is and mirrored, and
the probabilities are averaged. The classifiers are trained with random flips on
every axis, so every mirror image is a chunk they know, yet one view's score of a
proposal is noisy: on the quality bench's fixed proposals (24 held-out scans, 46
nodules, 3608 proposals, the residual classifier of run 2026-11-29_11.26.15) the
eight single views gave CPM 0.748 to 0.832 (0.783 unflipped); the mean of the
first 2 of `FLIP_VIEWS` 0.848, of the first 4 0.866 and of all 8 0.866, with
sensitivity at 1 FP/scan 0.78 -> 0.87 (4 and 8 views); for the run's last epoch
0.795 unflipped, 0.866 for 4 views and 0.857 for 8. Averaging log-probabilities
instead gave 0.860 (8 views). The views are ordered so that each axis is flipped in
half of the first 2, of the first 4 and of all 8; the default is 4. The cost is one
forward pass per view: on 2 CPU cores about 3 s per view for a scan's 150
proposals, nothing worth counting on a GPU.

A first look (``screen_below``): most proposals are vessel cross-sections that one
view already rules out, and the mean of 4 views does not rescue them. With
``screen_below`` each chunk is classified as it is first, and only those whose
probability reaches it get the other views (their mean then is exactly the mean
over all views, accumulated in the same order); the rest keep the one view's
probability. The diagnosis screens the nodule classifier's proposals at
`SCREEN_BELOW` = 0.1. Measured on the quality bench's 48 held-out scans (run
2026-11-30_12.06.02's models, the proposals of its UNet, 4 views): a screen at 0.02,
0.05, 0.1 and 0.2 sent 63%, 40%, 26% and 15% of the proposals on to the other
views and left CPM (0.926), its interval and every one of the 7 sensitivities
exactly as without it; at p(nodule) >= 0.5 they accepted 5.63, 5.60, 5.50 and 5.21
false positives per scan, against 5.63 without, at the same sensitivity (0.954).
One view alone scored CPM 0.870. The classification took 751 s for the 48 scans
with 4 views on every proposal and 196 s with 1; screened at 0.1, about 340 s. In
``luna bench --sections diagnosis`` it fell from 7.5-10.4 s to 2.9-3.1 s per scan.

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

__all__ = ["DEFAULT_VIEWS", "FLIP_VIEWS", "SCREEN_BELOW", "classify_chunks", "check_views"]

# The dims of a (N, 1, D, H, W) batch mirrored in each view, ordered so that each
# axis is flipped in half of the first 2, of the first 4 and of all 8.
FLIP_VIEWS: tuple[tuple[int, ...], ...] = ((), (2, 3, 4), (3, 4), (2,), (2, 4), (3,), (2, 3), (4,))
DEFAULT_VIEWS = 4
"""As good as all 8 on the bench (CPM 0.866 against 0.866 and 0.857 for two checkpoints) at half the cost."""
SCREEN_BELOW = 0.1
"""The nodule classifier's first look: a proposal one view scores below this keeps that score (module docstring)."""


def check_views(views: int, option: str = "--views") -> None:
    """A `LunaError` unless ``views`` is a whole number of test-time views, 1 to 8."""
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= len(FLIP_VIEWS):
        raise LunaError(f"{option} {views!r}: must be a whole number from 1 (no test-time flips) to "
                        f"{len(FLIP_VIEWS)} (every mirror image)")


def classify_chunks(
    model: torch.nn.Module,
    ct: Ct,
    centers_xyz: Sequence[Sequence[float]],
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    views: int = DEFAULT_VIEWS,
    screen_below: float | None = None,
    source: str = "the classifier",
) -> np.ndarray:
    """p(positive class) for the chunk around each centre (float64, one per centre).

    ``views``: the mean over the first ``views`` of `FLIP_VIEWS` (module docstring);
    1 classifies each chunk once, as it is. ``screen_below``: only chunks whose
    unflipped probability reaches it get the other views; None gives every chunk all
    of them (module docstring).

    ``source`` names the model in the error raised when its output is not a
    probability (see the module docstring).
    ``batch_size``: chunks per forward pass, by default 4 on the CPU and 32 on CUDA.
    On the CPU small batches are both faster and far lighter (measured on 192 chunks:
    92 chunks/s and +23 MiB with 4, 79/s and +358 MiB with 32).
    """
    check_views(views, "views")
    n = len(centers_xyz)
    device = torch.device(device)
    if batch_size is None:
        batch_size = 32 if device.type == "cuda" else 4
    run = dict(device=device, batch_size=batch_size, amp_dtype=amp_dtype)
    if screen_below is None:
        out = _summed_views(model, ct, centers_xyz, FLIP_VIEWS[:views], np.zeros(n), **run) / views
    else:
        out = _summed_views(model, ct, centers_xyz, FLIP_VIEWS[:1], np.zeros(n), **run)
        rest = np.flatnonzero(out >= screen_below) if views > 1 else np.empty(0, dtype=np.int64)
        if rest.size:
            out[rest] = _summed_views(model, ct, [centers_xyz[i] for i in rest], FLIP_VIEWS[1:views], out[rest],
                                      **run) / views
    bad = np.flatnonzero(~((out >= 0) & (out <= 1)))  # NaN fails both comparisons
    if bad.size:
        xyz = ", ".join(f"{v:.1f}" for v in centers_xyz[int(bad[0])])
        raise LunaError(
            f"{source} gave {out[bad[0]]} as a probability for {bad.size} of {n} chunks (the first "
            f"at xyz {xyz} mm in {ct.series_uid}): its weights are broken (a diverged training?) or "
            f"overflow{' under autocast: try without --amp' if amp_dtype is not None else ''}; use another checkpoint"
        )
    return out


def _summed_views(model, ct: Ct, centers_xyz, flips: Sequence[tuple[int, ...]], totals: np.ndarray, *,
                  device: torch.device, batch_size: int, amp_dtype) -> np.ndarray:
    """``totals`` (float64, one per centre) plus the probability of each view in ``flips`` (entries of
    `FLIP_VIEWS`), added in their order."""
    out = np.array(totals, dtype=np.float64)
    n = len(centers_xyz)
    if n == 0:
        return out
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
            batch = batch.contiguous(memory_format=torch.channels_last_3d)  # torch.flip keeps the layout
            total = torch.from_numpy(out[start:stop]).to(device)
            for dims in flips:
                view = torch.flip(batch, dims) if dims else batch
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(view)
                total += torch.softmax(logits.float(), dim=1)[:, POSITIVE_CLASS]
            out[start:stop] = total.cpu().numpy()
    return out
