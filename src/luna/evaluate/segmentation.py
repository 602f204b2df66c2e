"""How good a segmentation is for what comes after it: the nodules its grouping proposes.

`score_segmentation` scores one scan's probability volume the way the diagnosis
uses it: `luna.inference.grouping.group_detections` turns it into candidate
detections (threshold, in-plane opening, 26-connected components, size filter), and
each detection is matched to the annotated nodules with the LUNA16 hit rule
(`luna.annotations.match_annotations`: centre closer than the radius). A nodule is
*found* when some detection hits it; a detection that hits no nodule is a false
positive. So the training stage picks its best checkpoint by the very count the
classifier will face, not by raw components that grouping would merge, split or
drop. Voxel counts against the nodule masks (precision, recall, Dice) are kept
beside it for the curves.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Sequence

import numpy as np

from luna.annotations import Annotation, match_annotations
from luna.ct import Ct
from luna.inference.grouping import group_detections
from luna.inference.lungs import keep_near_lungs

__all__ = ["SegmentationCounts", "score_segmentation"]


@dataclass
class SegmentationCounts:
    """What a segmentation got right on some scans, summable over scans."""

    scans: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    nodules: int = 0
    nodules_found: int = 0
    fp_detections: int = 0

    def __add__(self, other: "SegmentationCounts") -> "SegmentationCounts":
        return SegmentationCounts(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def metrics(self, fp_bound: float) -> dict[str, float]:
        """Voxel precision/recall/Dice, nodule recall, false-positive detections per scan, and the score.

        score = nodule recall, scaled down by ``fp_bound / fp_per_scan`` when the false
        positive detections per scan exceed ``fp_bound``: recall is what counts (a
        nodule missed here is never seen again), at a false-positive rate the
        classifier can still sort out.
        """
        ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
        recall = ratio(self.nodules_found, self.nodules)
        fp_per_scan = ratio(self.fp_detections, self.scans)
        score = recall if fp_per_scan <= fp_bound else recall * fp_bound / fp_per_scan
        return {
            "precision": ratio(self.tp, self.tp + self.fp),
            "recall": ratio(self.tp, self.tp + self.fn),
            "dice": ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "nodule_recall": recall,
            "fp_per_scan": fp_per_scan,
            "score": score,
        }


def score_segmentation(
    probabilities: np.ndarray,
    ct: Ct,
    nodules: Sequence[Annotation],
    labels: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    lung_margin_mm: float | None = None,
    detections: Sequence | None = None,
) -> SegmentationCounts:
    """Counts for one scan (see the module docstring).

    ``nodules``: the scan's annotated nodules; ``labels``: the nodule mask
    (0 background, k > 0 nodule k) for the voxel counts, None to skip them.
    ``lung_margin_mm``: keep only detections that far from the lungs at most, as the
    diagnosis does (`luna.inference.lungs`); None keeps all. ``detections``: the
    grouping's result when the caller has it already (`luna.inference.pipeline.propose`).
    """
    nodules = [n for n in nodules if n.series_uid == ct.series_uid]
    if detections is None:
        detections, _ = keep_near_lungs(group_detections(probabilities, ct, threshold=threshold), ct,
                                        lung_margin_mm)
    centers = np.array([d.center_xyz for d in detections], dtype=np.float64).reshape(-1, 3)
    hit = match_annotations([ct.series_uid] * len(detections), centers, nodules)
    counts = SegmentationCounts(
        scans=1,
        nodules=len(nodules),
        nodules_found=len(set(hit[hit >= 0].tolist())),
        fp_detections=int(np.count_nonzero(hit < 0)),
    )
    if labels is not None:
        predicted, truth = probabilities > threshold, labels > 0
        counts.tp = int(np.count_nonzero(predicted & truth))
        counts.fp = int(np.count_nonzero(predicted & ~truth))
        counts.fn = int(np.count_nonzero(~predicted & truth))
    return counts
