"""End-to-end detection quality: what a user gets from the whole pipeline on a set of scans.

`evaluate_diagnoses` takes one `Diagnosis` per scan (every classified proposal,
accepted or not, with its p(nodule)) and the reference nodules, and measures:

- the LUNA16 FROC and CPM (`luna.evaluate.froc`, the challenge's rules) with a scan
  bootstrap interval, and the sensitivities at the 7 rates (1/8 ... 8 FP per scan);
- at the operating point (the accepted nodules, ``p_nodule >= nodule threshold``):
  sensitivity and false positives per scan (excluded findings count as neither);
- the recall of the segmentation stage alone: reference nodules hit by any proposal,
  whatever the classifier said, the merged duplicates (`Diagnosis.duplicates`)
  included — the ceiling the classifier cannot raise;
- malignancy on the *detected* nodules (a reference nodule with a known rating hit by
  an accepted detection that has a p(malignant)): the model's ROC AUC against the
  AUC of the reference diameter alone, the baseline the book found hard to beat, and
  (with a bootstrap) the one-sided 95% lower bound of the model's gain over it, a
  paired bootstrap over those nodules (`luna.metrics.auc_gain_lower_bound`).

The training stages log `DetectionQuality.metrics` to TensorBoard every epoch and
pick their best checkpoint by the CPM; ``luna.bench --sections quality`` writes it
for a held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from luna.annotations import Annotation, hit_pairs
from luna.evaluate.froc import FROC_RATES, FrocResult, evaluate_froc, sized_excluded
from luna.inference.pipeline import Diagnosis
from luna.io.luna16 import Results
from luna.metrics import auc_gain_lower_bound, roc_auc

__all__ = ["DetectionQuality", "evaluate_diagnoses"]


@dataclass(frozen=True)
class DetectionQuality:
    froc: FrocResult
    scans: int
    nodules: int
    proposal_recall: float
    sensitivity_at_threshold: float
    fp_per_scan_at_threshold: float
    proposals_per_scan: float
    outside_lungs_per_scan: float
    malignancy_scored: tuple[tuple[Annotation, float], ...]
    """The detected nodules with a rating, each with the highest p(malignant) of its accepted hits."""

    @property
    def sensitivity_at(self) -> dict[float, float]:
        return dict(zip(self.froc.rates, self.froc.sensitivities))

    @property
    def malignancy_nodules(self) -> int:
        return len(self.malignancy_scored)

    def malignancy_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(labels, p(malignant), reference diameters) of the scored nodules; None unless both classes occur."""
        labels = np.array([bool(a.is_malignant) for a, _ in self.malignancy_scored], dtype=bool)
        if not (labels.any() and not labels.all()):
            return None
        return (labels, np.array([p for _, p in self.malignancy_scored], dtype=np.float64),
                np.array([a.diameter_mm for a, _ in self.malignancy_scored], dtype=np.float64))

    @property
    def malignancy_auc(self) -> float | None:
        arrays = self.malignancy_arrays()
        return roc_auc(arrays[0], arrays[1]) if arrays else None

    @property
    def diameter_auc(self) -> float | None:
        arrays = self.malignancy_arrays()
        return roc_auc(arrays[0], arrays[2]) if arrays else None

    def malignancy_gain_low(self, draws: int = 1000) -> float | None:
        """The 95% lower bound of (model AUC - diameter AUC) on the scored nodules (module docstring)."""
        arrays = self.malignancy_arrays()
        return auc_gain_lower_bound(arrays[0], arrays[1], arrays[2], draws=draws) if arrays else None

    def metrics(self) -> dict[str, float]:
        """Flat name -> number, for logs and JSON (the interval only with a bootstrap, the malignancy AUCs only
        with rated detected nodules of both classes)."""
        out = {
            "cpm": self.froc.cpm,
            "sensitivity_at_1": self.sensitivity_at[1.0],
            "sensitivity_at_4": self.sensitivity_at[4.0],
            "sensitivity_at_threshold": self.sensitivity_at_threshold,
            "fp_per_scan": self.fp_per_scan_at_threshold,
            "proposal_recall": self.proposal_recall,
            "proposals_per_scan": self.proposals_per_scan,
        }
        if self.froc.ci is not None:  # without a bootstrap (training's validation) there is no interval
            out["cpm_low"], out["cpm_high"] = self.froc.ci
        if self.malignancy_auc is not None:
            out["malignancy_auc"] = self.malignancy_auc
            out["diameter_auc"] = self.diameter_auc
        return out

    def summary(self) -> dict:
        return {
            "scans": self.scans,
            "nodules": self.nodules,
            "cpm": self.froc.cpm,
            "cpm_95ci": self.froc.ci,
            "cpm_step": self.froc.cpm_step,
            "sensitivity_at_fp_per_scan": {f"{r:g}": s for r, s in zip(FROC_RATES, self.froc.sensitivities)},
            "operating_point": {"sensitivity": self.sensitivity_at_threshold,
                                "fp_per_scan": self.fp_per_scan_at_threshold},
            "segmentation_proposal_recall": self.proposal_recall,
            "proposals_per_scan": self.proposals_per_scan,
            "outside_lungs_per_scan": self.outside_lungs_per_scan,
            "malignancy": {"detected_nodules_with_rating": self.malignancy_nodules,
                           "model_auc": self.malignancy_auc, "diameter_auc": self.diameter_auc,
                           "model_gain_95_low": self.malignancy_gain_low() if self.froc.ci is not None else None},
            "counts": self.froc.counts,
        }


def evaluate_diagnoses(
    diagnoses: Sequence[Diagnosis],
    annotations: Sequence[Annotation],
    excluded: Sequence[Annotation] = (),
    *,
    bootstrap_draws: int = 1000,
    seed: int = 0,
) -> DetectionQuality:
    """The quality of ``diagnoses`` against the reference nodules (see the module docstring)."""
    uids = [d.series_uid for d in diagnoses]
    scans = set(uids)
    annotations = [a for a in annotations if a.series_uid in scans]
    excluded = [a for a in excluded if a.series_uid in scans]
    rows = [(d.series_uid, n) for d in diagnoses for n in d.nodules]
    # the segmentation's proposals: the findings, then the duplicates merged into them
    proposals = rows + [(d.series_uid, n) for d in diagnoses for n in d.duplicates]
    proposal_uids = [uid for uid, _ in proposals]
    proposal_xyz = np.array([n.center_xyz for _, n in proposals], dtype=np.float64).reshape(-1, 3)
    results = Results(proposal_uids[: len(rows)], proposal_xyz[: len(rows)],
                      np.array([n.p_nodule for _, n in rows], dtype=np.float64))
    froc = evaluate_froc(results, annotations, excluded, uids, bootstrap_draws=bootstrap_draws, seed=seed)

    # the FROC's rules: a detection inside several nodules hits each; excluded findings sized as the challenge does
    all_points, all_nodules = hit_pairs(proposal_uids, proposal_xyz, annotations)
    proposed = set(all_nodules.tolist())
    findings = all_points < len(rows)
    points, nodules = all_points[findings], all_nodules[findings]
    on_nodule = np.zeros(len(rows), dtype=bool)
    on_nodule[points] = True
    on_excluded = np.zeros(len(rows), dtype=bool)
    on_excluded[hit_pairs(results.series_uids, results.center_xyz, sized_excluded(excluded))[0]] = True
    accepted = np.array([n.accepted for _, n in rows], dtype=bool)
    detected = set(nodules[accepted[points]].tolist())
    false_positives = int(np.count_nonzero(accepted & ~on_nodule & ~on_excluded))

    # malignancy of the detected nodules: the best p(malignant) of their accepted hits
    p_malignant: dict[int, float] = {}
    for i, k in zip(points.tolist(), nodules.tolist()):
        nodule = rows[i][1]
        if nodule.accepted and nodule.p_malignant is not None:
            p_malignant[k] = max(p_malignant.get(k, 0.0), nodule.p_malignant)
    scored = tuple((annotations[k], p) for k, p in sorted(p_malignant.items())
                   if annotations[k].is_malignant is not None)

    n_scans = max(len(scans), 1)
    n_nodules = len(annotations)
    return DetectionQuality(
        froc=froc,
        scans=len(scans),
        nodules=n_nodules,
        proposal_recall=len(proposed) / n_nodules if n_nodules else 0.0,
        sensitivity_at_threshold=len(detected) / n_nodules if n_nodules else 0.0,
        fp_per_scan_at_threshold=false_positives / n_scans,
        proposals_per_scan=len(proposals) / n_scans,
        outside_lungs_per_scan=sum(d.outside_lungs for d in diagnoses) / n_scans,
        malignancy_scored=scored,
    )
