"""Binary classification metrics, one implementation for training, diagnosis and evaluation.

Inputs are numpy arrays of labels (0/1 or bool) and scores (probability of class 1).
Empty classes never give NaN: a ratio whose denominator is zero is reported as 0.0
(and AUC as 0.5, chance, when one class is absent), so TensorBoard curves and JSON
files stay finite. Ties in score are handled as in the Mann-Whitney statistic: a
tied positive/negative pair counts one half.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

__all__ = [
    "BinaryMetrics", "auc_gain_draws", "auc_gain_lower_bound", "binary_metrics", "roc_auc", "roc_curve",
    "precision_recall_curve", "two_class_resamples",
]


@dataclass(frozen=True)
class BinaryMetrics:
    """Counts and rates at one threshold, plus the threshold-free ROC AUC."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    auc: float

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.tn + self.fp

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    def as_dict(self) -> dict[str, float]:
        """Counts and every rate, for logs, TensorBoard and JSON."""
        out = {k: float(v) for k, v in asdict(self).items()}
        for name in ("precision", "recall", "specificity", "f1", "accuracy"):
            out[name] = getattr(self, name)
        # accuracy per class, as the book logged them
        out["accuracy_pos"] = self.recall
        out["accuracy_neg"] = self.specificity
        return out


def binary_metrics(labels, scores, threshold: float = 0.5) -> BinaryMetrics:
    """Confusion counts at ``score >= threshold`` and the ROC AUC."""
    labels, scores = _check(labels, scores)
    predicted = scores >= threshold
    tp = int(np.count_nonzero(predicted & labels))
    fp = int(np.count_nonzero(predicted & ~labels))
    fn = int(np.count_nonzero(~predicted & labels))
    tn = int(labels.size - tp - fp - fn)
    return BinaryMetrics(threshold, tp, fp, tn, fn, roc_auc(labels, scores))


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (probability a positive outranks a negative); 0.5 if a class is empty."""
    labels, scores = _check(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    # Rank-sum form with average ranks for ties: O(n log n) and exact.
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def two_class_resamples(labels, draws: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Bootstrap resamples of the items (index arrays, with replacement), skipping the draws that hold one class
    only (an AUC needs both): the resampling of every AUC interval and AUC comparison here."""
    labels = np.asarray(labels).astype(bool).ravel()
    rng = np.random.default_rng(seed)
    n = labels.size
    for _ in range(draws if n else 0):
        pick = rng.integers(0, n, n)
        sample = labels[pick]
        if sample.any() and not sample.all():
            yield pick


def auc_gain_draws(labels, scores, baseline, *, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """``AUC(scores) - AUC(baseline)`` on each paired bootstrap resample of the items (`two_class_resamples`):
    both scored on the same resampled items. Empty when no draw holds both classes."""
    labels, scores = _check(labels, scores)
    _, baseline = _check(labels, baseline)
    return np.array([roc_auc(labels[pick], scores[pick]) - roc_auc(labels[pick], baseline[pick])
                     for pick in two_class_resamples(labels, draws, seed)], dtype=np.float64)


def auc_gain_lower_bound(labels, scores, baseline, *, draws: int = 1000, level: float = 0.95, seed: int = 0) -> float:
    """One-sided lower confidence bound of ``AUC(scores) - AUC(baseline)`` by a paired bootstrap over the items.

    The bound is the ``1 - level`` quantile of `auc_gain_draws`. NaN when no draw holds
    both classes. With a dozen validation nodules the bound of any real model is well
    below 0: a win there is not told apart from chance.
    """
    gains = auc_gain_draws(labels, scores, baseline, draws=draws, seed=seed)
    return float(np.quantile(gains, 1.0 - level)) if gains.size else float("nan")


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), from (0, 0) to (1, 1).

    One point per distinct score, in decreasing threshold order; the first point has
    threshold +inf (nothing predicted positive).
    """
    labels, scores = _check(labels, scores)
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    n_pos, n_neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return fps / n_neg, tps / n_pos, thresholds


def precision_recall_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at each distinct score, decreasing threshold."""
    labels, scores = _check(labels, scores)
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    tps, fps, thresholds = tps[1:], fps[1:], thresholds[1:]
    precision = np.divide(tps, tps + fps, out=np.zeros_like(tps), where=(tps + fps) > 0)
    recall = tps / max(int(labels.sum()), 1)
    return precision, recall, thresholds


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray):
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # the last index of each run of equal scores is where a threshold can sit
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1] if scores.size else np.array([], int)
    tps = np.cumsum(sorted_labels)[ends].astype(np.float64)
    fps = (ends + 1 - tps).astype(np.float64)
    return np.r_[0.0, tps], np.r_[0.0, fps], np.r_[np.inf, sorted_scores[ends]]


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return labels, scores


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else 0.0
