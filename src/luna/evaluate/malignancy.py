"""Malignancy evaluation: ROC curve, AUC with a bootstrap interval, operating points.

`malignancy_roc`: the ROC curve (`luna.metrics.roc_curve`), the AUC
(`luna.metrics.roc_auc`) with a bootstrap interval over nodules, and operating
points (`luna.metrics.binary_metrics` at 0.5 and at the Youden-optimal threshold).
The CSV (`read_malignancy_results`) has ``seriesuid,coordX,coordY,coordZ,probability,label``
with label ``0``/``1`` (``True``/``False`` also accepted). Both classes must be
present: with one class the ROC is undefined (luna printed "AUC 0.5000" for it).

`nodule_malignancy_rows` makes those rows from a diagnosis, end to end: one row per
rated annotated nodule of the series (label: its ``is_malignant``), at the
annotation's centre, with probability = the highest p(malignant) of the *accepted*
detections that hit it (`luna.annotations.match_annotations`), and 0.0 when none
does: a nodule the pipeline missed or rejected was not called malignant. Detections
on no annotated nodule are not rows (the FROC counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Sequence

import numpy as np

from luna.annotations import Annotation, match_annotations
from luna.errors import LunaError
from luna.evaluate.froc import interval
from luna.metrics import binary_metrics, roc_auc, roc_curve, two_class_resamples

__all__ = ["MalignancyResult", "malignancy_roc", "nodule_malignancy_rows"]


@dataclass(frozen=True)
class MalignancyResult:
    auc: float
    ci: list[float] | None
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    operating_points: list[dict]
    positives: int
    negatives: int

    def summary(self) -> dict:
        return {
            "auc": self.auc,
            "ci": self.ci,
            "positives": self.positives,
            "negatives": self.negatives,
            "operating_points": self.operating_points,
        }


def malignancy_roc(labels, probabilities, draws: int = 1000, seed: int = 0, *,
                   source: str = "the labels") -> MalignancyResult:
    """ROC, AUC with a bootstrap interval over nodules, operating points (0.5, Youden).

    `LunaError` naming ``source`` (the file the labels came from) unless both classes occur.
    """
    labels = np.asarray(labels, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not len(labels):
        raise LunaError(f"{source}: no nodules; expected one row per nodule with its 0/1 malignancy label.")
    if labels.all() or not labels.any():
        kind = "malignant (label 1)" if labels.all() else "benign (label 0)"
        raise LunaError(
            f"{source}: all {len(labels)} nodule(s) are {kind}; a ROC curve and its AUC need both "
            "malignant and benign nodules. Evaluate a set that holds both."
        )
    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    auc = roc_auc(labels, probabilities)
    aucs = [roc_auc(labels[pick], probabilities[pick]) for pick in two_class_resamples(labels, draws, seed)]
    points = []
    youden = int(np.argmax(tpr - fpr)) if len(tpr) else 0
    chosen = [("fixed", 0.5)]
    if np.isfinite(thresholds[youden]):
        chosen.append(("youden", float(thresholds[youden])))
    for name, threshold in chosen:
        m = binary_metrics(labels, probabilities, threshold)
        points.append(
            {"name": name, "threshold": threshold, "sensitivity": m.recall,
             "specificity": m.specificity, "precision": m.precision,
             "tp": m.tp, "fp": m.fp, "tn": m.tn, "fn": m.fn}
        )
    return MalignancyResult(
        auc, interval(np.array(aucs)), fpr, tpr, thresholds, points,
        int(labels.sum()), int((~labels).sum()),
    )




def nodule_malignancy_rows(series_uid: str, nodules: Sequence, annotations: Sequence[Annotation]) -> list[tuple]:
    """``(seriesuid, x, y, z, probability, label)`` per rated nodule of ``series_uid`` (module docstring)."""
    rated = [a for a in annotations if a.series_uid == series_uid and a.is_malignant is not None]
    scored = [n for n in nodules if n.accepted and n.p_malignant is not None]
    best = np.zeros(len(rated))
    if rated and scored:
        hits = match_annotations([series_uid] * len(scored), [n.center_xyz for n in scored], rated)
        for n, h in zip(scored, hits):
            if h >= 0:
                best[h] = max(best[h], n.p_malignant)
    return [(series_uid, *a.center_xyz, float(p), int(bool(a.is_malignant))) for a, p in zip(rated, best)]
