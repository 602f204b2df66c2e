"""Torch datasets, samplers and batch augmentation for training.

- `luna.data.classification`: `ChunkDataset` (nodule and malignancy classifiers),
  `BalancedSampler`, `split_candidates`, `worker_init_fn`.
- `luna.data.augment`: `Augment3d`, per-batch 3D augmentation on the device.
"""

from luna.data.augment import AUGMENT_DEFAULTS, Augment3d, AugmentParams, warp
from luna.data.classification import (
    LABEL_MODES,
    BalancedSampler,
    ChunkDataset,
    ChunkSample,
    annotated_nodules,
    split_candidates,
    worker_init_fn,
)

__all__ = [
    "AUGMENT_DEFAULTS",
    "LABEL_MODES",
    "Augment3d",
    "AugmentParams",
    "BalancedSampler",
    "ChunkDataset",
    "ChunkSample",
    "annotated_nodules",
    "split_candidates",
    "warp",
    "worker_init_fn",
]
