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

The operating threshold. A UNet's probabilities are not calibrated, and how
confident it is changes as it trains: trained on nodule and non-nodule crops in
equal numbers, it grows ever surer of nodule-like tissue, so at a fixed 0.5 its
blobs swell and a nodule merges with the vessel or wall it touches (the merged
blob's centre lies off the nodule, or the blob is too big to be a candidate).
Measured with run ``2026-11-29_16.32.30``'s UNet after its 10th epoch on the 24
held-out scans of the quality bench (46 nodules): 45 nodules hold voxels above
0.99, yet at 0.5 only 38 nodules are proposed, among 1,038 proposals per
scan; at 0.998, 44 among 161 per scan, where the 2nd epoch's UNet at 0.5 proposed
42 among 150. So the threshold belongs to the model: `score_thresholds` scores the
grouping at every threshold of `OPERATING_THRESHOLDS`, and `choose_threshold` takes
the lowest one whose false-positive detections per scan stay within the bound the
classifier can sort out; the training stage stores it in the checkpoint, and the
diagnosis uses it.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Mapping, Sequence

import numpy as np

from luna.annotations import Annotation, match_annotations
from luna.ct import Ct
from luna.inference.grouping import group_detections
from luna.inference.lungs import LungMask, keep_near_lungs, lung_mask

__all__ = ["OPERATING_THRESHOLDS", "SegmentationCounts", "choose_threshold", "score_segmentation",
           "score_thresholds"]

OPERATING_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
"""The thresholds `choose_threshold` picks from: about evenly spaced in logit (0 to 6.9)."""


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
    lungs: LungMask | None = None,
) -> SegmentationCounts:
    """Counts for one scan (see the module docstring).

    ``nodules``: the scan's annotated nodules; ``labels``: the nodule mask
    (0 background, k > 0 nodule k) for the voxel counts, None to skip them.
    ``lung_margin_mm``: keep only detections that far from the lungs at most, as the
    diagnosis does (`luna.inference.lungs`); None keeps all. ``detections``: the
    grouping's result when the caller has it already (`luna.inference.pipeline.propose`);
    ``lungs``: the CT's lung mask when the caller has it already.
    """
    nodules = [n for n in nodules if n.series_uid == ct.series_uid]
    if detections is None:
        detections, _ = keep_near_lungs(group_detections(probabilities, ct, threshold=threshold), ct,
                                        lung_margin_mm, lungs)
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
        counts.fp = int(np.count_nonzero(predicted)) - counts.tp
        counts.fn = int(np.count_nonzero(truth)) - counts.tp
    return counts


def score_thresholds(
    probabilities: np.ndarray,
    ct: Ct,
    nodules: Sequence[Annotation],
    labels: np.ndarray | None = None,
    *,
    thresholds: Sequence[float] = OPERATING_THRESHOLDS,
    lung_margin_mm: float | None = None,
    lungs: LungMask | None = None,
    grouped: Mapping[float, Sequence] | None = None,
) -> dict[float, SegmentationCounts]:
    """`score_segmentation` of one scan at each of ``thresholds``, the lung mask made once; ``grouped``:
    the detections the caller has already grouped at some of them (the same lung rule applied)."""
    grouped = grouped or {}
    if lung_margin_mm is not None and lungs is None and any(t not in grouped for t in thresholds):
        lungs = lung_mask(ct)
    return {t: score_segmentation(probabilities, ct, nodules, labels, threshold=t, lung_margin_mm=lung_margin_mm,
                                  lungs=lungs, detections=grouped.get(t))
            for t in thresholds}


def choose_threshold(counts: Mapping[float, SegmentationCounts], fp_bound: float) -> float:
    """The operating threshold: the lowest of ``counts``' thresholds whose false-positive detections per
    scan stay within ``fp_bound``, else (none does) the highest. See the module docstring.

    The lowest within the bound, not the one with the best recall on the validation scans: a
    validation set finds every nodule at many thresholds (a few nodules, all scored near 1), and
    the highest of those would fit them; the bound is what the classifier after it can afford.
    """
    if not counts:
        raise ValueError("no thresholds to choose from")
    within = [t for t, c in counts.items() if c.metrics(fp_bound)["fp_per_scan"] <= fp_bound]
    return min(within) if within else max(counts)
