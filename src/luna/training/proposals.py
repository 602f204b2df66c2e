"""The segmentation's own proposals on the training and validation scans, cached.

The classifier must reject what the segmentation proposes at diagnosis time: vessel
cross-sections, bifurcations, wall bumps — a different population from the CSV
candidates it is otherwise trained on. So the classifier stages run the first half of
the diagnosis (`luna.inference.pipeline.propose`: segment, group, keep what is near
the lungs) with the run's segmentation model over every scan once, and

- on the training scans, proposals that hit no annotated nodule (and no excluded
  finding) become *hard negatives*, proposals that hit a nodule extra positives
  centred where the grouping puts them (`training_infos`);
- on the validation scans, the proposals are what the end-to-end validation
  classifies every epoch (the segmentation does not change while a classifier trains).

Proposals are cached per scan in the chunk cache (`luna.cache.ArrayCache`) as an
``(n, 5)`` float64 array ``x, y, z, diameter_mm, max_probability``, keyed by the scan's
identity, the segmentation checkpoint's identity (name, size, mtime: a retrained
model gets new keys) and the grouping settings, so a second run or a resume segments
nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from luna.annotations import Annotation, CandidateInfo, match_annotations
from luna.cache import ArrayCache
from luna.ct import Ct
from luna.datadir import DataDir
from luna.inference.grouping import Detection
from luna.inference.pipeline import (
    DEFAULT_SEGMENTATION_THRESHOLD,
    LUNG_MARGIN_MM,
    SEARCH_BUDGET,
    Proposals,
    propose,
)
from luna.io import load_ct, source_identity

__all__ = ["PROPOSALS_FORMAT", "ScanProposals", "proposals_for", "training_infos"]

log = logging.getLogger(__name__)

PROPOSALS_FORMAT = 2
"""2: `propose` adds the search threshold's faint blobs (`luna.inference.grouping.add_faint`)."""


@dataclass(frozen=True)
class ScanProposals:
    """One scan's proposals as columns."""

    series_uid: str
    center_xyz: np.ndarray  # (n, 3)
    diameter_mm: np.ndarray  # (n,)
    max_probability: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.diameter_mm)

    def as_proposals(self, ct: Ct) -> Proposals:
        """The pipeline's `Proposals` for ``ct`` (for `classify_proposals`); the voxel centres
        come from its geometry, the grouping's sizes and bounding boxes are not cached."""
        centers_irc = ct.geometry.xyz_to_irc(self.center_xyz) if len(self) else np.zeros((0, 3))
        detections = tuple(
            Detection(center_xyz=tuple(map(float, xyz)), center_irc=tuple(map(float, irc)), voxels=0,
                      volume_mm3=0.0, diameter_mm=float(d), mean_probability=float(p), max_probability=float(p),
                      bbox_irc=(0, 0, 0, 0, 0, 0))
            for xyz, irc, d, p in zip(self.center_xyz, centers_irc, self.diameter_mm, self.max_probability)
        )
        return Proposals(detections, 0)


def proposals_for(
    uids: Sequence[str],
    data: DataDir,
    cache: ArrayCache,
    segmentation: torch.nn.Module,
    checkpoint: Path,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    threshold: float = DEFAULT_SEGMENTATION_THRESHOLD,
    lung_margin_mm: float = LUNG_MARGIN_MM,
    search_budget: int = SEARCH_BUDGET,
    progress: Callable[[], None] | None = None,
) -> dict[str, ScanProposals]:
    """Every scan's proposals, from the cache or segmented now (see the module docstring);
    ``search_budget``: the faint blobs `propose` adds per scan, part of the cache key."""
    model_id = source_identity(checkpoint)
    out: dict[str, ScanProposals] = {}
    for uid in uids:
        path = data.scan_path(uid)
        key = (f"proposals/v{PROPOSALS_FORMAT}/{uid}/{source_identity(path)}/{model_id}/"
               f"{threshold:.6f}/{lung_margin_mm:.1f}/{search_budget}")

        def build() -> np.ndarray:
            ct = load_ct(path, series_uid=uid)
            found = propose(ct, segmentation, device=device, amp_dtype=amp_dtype, segmentation_threshold=threshold,
                            lung_margin_mm=lung_margin_mm, search_budget=search_budget)
            return np.array([(*d.center_xyz, d.diameter_mm, d.max_probability) for d in found.detections],
                            dtype=np.float64).reshape(-1, 5)

        table = cache.get_or_build(key, build)
        out[uid] = ScanProposals(uid, table[:, :3], table[:, 3], table[:, 4])
        if progress is not None:
            progress()
    return out


def training_infos(
    proposals: dict[str, ScanProposals],
    annotations: Sequence[Annotation],
    excluded: Sequence[Annotation] = (),
) -> tuple[list[CandidateInfo], list[CandidateInfo]]:
    """(hard negatives, extra positives) from the training scans' proposals.

    A proposal that hits an annotated nodule (the LUNA16 hit rule) is a positive with
    that nodule's diameter and malignancy, centred where the grouping put it; one that
    hits an excluded finding is dropped (neither label is right); the others are
    negatives.
    """
    uids = [uid for uid, p in proposals.items() for _ in range(len(p))]
    if not uids:
        return [], []
    centers = np.concatenate([p.center_xyz for p in proposals.values()])
    hit = match_annotations(uids, centers, annotations)
    on_excluded = match_annotations(uids, centers, excluded) >= 0
    negatives, positives = [], []
    for uid, xyz, k, skip in zip(uids, centers, hit, on_excluded):
        center = tuple(float(v) for v in xyz)
        if k >= 0:
            a = annotations[k]
            positives.append(CandidateInfo(uid, center, True, True, bool(a.is_malignant), a.diameter_mm))
        elif not skip:
            negatives.append(CandidateInfo(uid, center, False, False, False, 0.0))
    return negatives, positives
