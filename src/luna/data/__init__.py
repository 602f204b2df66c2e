"""Torch datasets, samplers and batch augmentation for training.

- `luna.data.classification`: `ChunkDataset` (nodule and malignancy classifiers),
  `BalancedSampler`, `split_candidates`, `worker_init_fn`, `worker_error`.
- `luna.data.augment`: `Augment3d`, per-batch 3D augmentation on the device.
- `luna.data.augment2d`: `Augment2d`, the same for 2D slices with their labels.
- `luna.data.tubes`: `TubeDistractors`, straight vessel-like tubes drawn into the nodule
  classifier's training chunks where their labels allow.
"""

from luna.data.augment import AUGMENT_DEFAULTS, Augment3d, AugmentParams, warp
from luna.data.augment2d import Augment2d
from luna.data.classification import (
    LABEL_MODES,
    BalancedSampler,
    ChunkDataset,
    ChunkSample,
    annotated_nodules,
    split_candidates,
    worker_error,
    worker_init_fn,
)
from luna.data.tubes import TubeDistractors

__all__ = [
    "AUGMENT_DEFAULTS",
    "Augment2d",
    "LABEL_MODES",
    "Augment3d",
    "AugmentParams",
    "BalancedSampler",
    "ChunkDataset",
    "ChunkSample",
    "TubeDistractors",
    "annotated_nodules",
    "split_candidates",
    "warp",
    "worker_error",
    "worker_init_fn",
]
